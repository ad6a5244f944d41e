"""Train an image classifier on ImageFolder data. The whole loop is in main(), top to bottom.

    python train.py --model resnet50 --data.root DIR            # defaults
    python train.py --preset fashion-mnist --epochs 5           # a preset from configs/, overridden
    python train.py --resume runs/NAME                           # continue a run exactly where it stopped
    torchrun --nproc_per_node=2 train.py ...                     # DDP, one process per device

Order of events: set-up -> data -> model/optimizer -> resume -> epochs (steps, validation, checkpoints).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import time
from contextlib import ExitStack, nullcontext

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from classifier import checkpoint as ckpt
from classifier import distributed, hardware, plots
from classifier.calibration import calibrate_best
from classifier.config import (
    TrainConfig,
    parse_cli,
    save_json,
    to_dict,
)
from classifier.data import (
    EpochSampler,
    ImageDataset,
    build_splits,
    class_counts,
    class_table,
    drop_unreadable,
    eval_transform,
    fingerprint,
    make_loader,
    peek_batch,
    preprocessing_spec,
    train_transform,
)
from classifier.debugging import overfit_one_batch
from classifier.ema import build_ema, decay_per_step
from classifier.fastdata import make_tensor_loaders
from classifier.faults import NonFiniteWatch, StopRequest, shutdown_workers
from classifier.imbalance import inverse_frequency_weights, logit_bias, rarest_classes, sampler_weights
from classifier.losses import BatchMixer, build_criterion
from classifier.metrics import build_train_metrics, build_val_metrics, evaluate
from classifier.models import build_model, check_input_size, fold_logit_bias
from classifier.optim import build_optimizer, default_lr, lr_at, milestones_in_steps
from classifier.runlog import NullLog, RunLog, check_writable, environment, run_directory
from classifier.selection import pick_weights, rare_recall_text, update_best


def main(cfg: TrainConfig) -> dict:
    """Train with `cfg`. SIGINT/SIGTERM stop the run cleanly (see classifier/faults.py) while it runs.

    Whichever way train() leaves (done, an error, a NaN stop, a signal), `on_exit` first shuts down the
    data loaders' worker processes (faults.shutdown_workers says why that cannot wait for exit)."""
    stop = StopRequest().install()
    try:
        with ExitStack() as on_exit:
            return train(cfg, stop, on_exit)
    finally:
        stop.uninstall()
        distributed.teardown()


def train(cfg: TrainConfig, stop: StopRequest, on_exit: ExitStack) -> dict:
    # --- set-up --------------------------------------------------------------------------------------
    dist_info, device = distributed.setup(cfg.device)
    resumed = ckpt.load_checkpoint(cfg.resume) if cfg.resume is not None else None
    if resumed is not None:
        ckpt.check_resumable(resumed, resumed["loaded_from"])
    run_dir = run_directory(cfg, resumed)
    distributed.barrier()  # every rank has checked the run directory before rank 0 writes into it
    if dist_info.is_main:
        check_writable(run_dir)
    log = RunLog(run_dir) if dist_info.is_main else NullLog()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    on_exit.callback(torch.autograd.set_detect_anomaly, torch.is_anomaly_enabled())  # as it was, after
    torch.autograd.set_detect_anomaly(cfg.debug)  # slow; names the op that produced a NaN gradient
    # Hardware-dependent settings: 'auto' resolved for this machine; each choice and its reason is
    # printed here and written to config.json (classifier/hardware.py).
    precision = hardware.resolve_precision(cfg.precision, device)
    channels_last = hardware.resolve_channels_last(cfg.channels_last, device, precision.value)
    processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    num_workers = hardware.resolve_num_workers(cfg.data.num_workers, processes_per_node)
    requested = {
        "precision": cfg.precision,
        "channels_last": cfg.channels_last,
        "num_workers": cfg.data.num_workers,
    }
    choices = {"precision": precision, "channels_last": channels_last, "num_workers": num_workers}
    for name, choice in choices.items():
        log.print(f"{'warning: ' if choice.warn else ''}{name} {choice.value}: {choice.reason}")
    if resumed is not None:
        ckpt.check_resumed_precision(resumed, precision.value, cfg.accept_config_changes)
        ckpt.check_resumed_rng(resumed, cfg.accept_config_changes)

    # --- data: one class mapping from train/, separate datasets per split ----------------------------
    d = cfg.data
    expected_classes = resumed["classes"] if resumed else None
    try:
        splits = build_splits(d.root, d.val_fraction, cfg.seed, classes=expected_classes)
    except (FileNotFoundError, ValueError) as err:  # each names the root, folder or class at fault
        raise SystemExit(f"error: {err}") from None
    classes, num_classes = splits.classes, len(splits.classes)
    if not distributed.all_equal(classes):
        raise SystemExit(
            f"error: the ranks read different class folders from {d.root}; is it the same data on every node?"
        )
    if d.scan_images:  # decode every file once now, rather than crash in a worker in epoch 3
        splits = drop_unreadable(
            splits,
            d.root,
            skip=d.skip_bad_images,
            workers=max(1, num_workers.value),
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            report=run_dir / "bad_images.txt" if dist_info.is_main else None,
            log=log.print,
        )
    counts = {s: class_counts(getattr(splits, s), num_classes) for s in ("train", "val", "test")}
    dataset = fingerprint(splits)
    if resumed is not None and resumed["dataset"] != dataset:
        # The samplers index the file list: on other files, the same positions are other images.
        changed = (
            f"the files under {d.root} changed since the checkpoint was written (counts were "
            f"{resumed['dataset']['counts']}, now {dataset['counts']})"
        )
        if not cfg.accept_config_changes:
            raise SystemExit(
                f"error: {changed}; resumed on them, the run would not continue the interrupted "
                "one exactly. Pass --accept-config-changes to continue on the new files."
            )
        log.print(f"warning: {changed}; continuing on the new files (--accept-config-changes)")
    log.print(class_table(classes, counts))
    preprocessing = preprocessing_spec(d.image_size, d.resize_size, d.mean, d.std, d.interpolation)
    augment = train_transform(
        d.image_size,
        d.crop_scale,
        d.crop_ratio,
        d.hflip,
        d.color_jitter,
        d.mean,
        d.std,
        d.interpolation,
        auto_augment=d.auto_augment,
        randaugment_num_ops=d.randaugment_num_ops,
        randaugment_magnitude=d.randaugment_magnitude,
        random_erasing=d.random_erasing,
    )
    train_set = ImageDataset(splits.train, augment)
    val_set = ImageDataset(splits.val, eval_transform(preprocessing))
    labels = torch.tensor([label for _, label in splits.train])
    sample_weights = sampler_weights(labels, counts["train"], d.sampler_alpha) if d.weighted_sampler else None
    rank, world = dist_info.rank, dist_info.world_size
    train_sampler = EpochSampler(
        len(train_set), shuffle=True, seed=cfg.seed, weights=sample_weights, rank=rank, world_size=world
    )
    val_sampler = EpochSampler(len(val_set), shuffle=False, rank=rank, world_size=world)
    workers = 0 if cfg.debug else num_workers.value  # main-process loading: breakpoints in data code work
    loader_args = dict(batch_size=d.batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    if d.fast_path:  # decoded once into tensors, augmented a batch at a time on the device
        train_loader, val_loader = make_tensor_loaders(
            splits,
            train_sampler,
            val_sampler,
            d,
            preprocessing,
            device=device,
            channels_last=channels_last.value,
            workers=workers,
            progress=cfg.progress and dist_info.is_main,
        )
    else:
        train_loader = make_loader(train_set, train_sampler, drop_last=True, **loader_args)
        val_loader = make_loader(val_set, val_sampler, drop_last=False, **loader_args)
    on_exit.callback(shutdown_workers, train_loader)
    on_exit.callback(shutdown_workers, val_loader)

    # Derived once, never written back into cfg.
    accum = cfg.optim.grad_accum_steps
    batches_per_epoch = len(train_sampler) // d.batch_size
    cap = d.max_train_batches
    if cap is not None and cap < 1:
        raise SystemExit(f"error: --data.max-train-batches {cap}: must be at least 1 (or None)")
    if cap is not None or cfg.debug:  # --debug alone: 5 batches
        batches_per_epoch = min(batches_per_epoch, cap if cap is not None else 5)
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch == 0:
        raise SystemExit(
            f"error: {len(train_sampler)} training images per process cannot fill one optimizer step of "
            f"--data.batch-size {d.batch_size} x --optim.grad-accum-steps {accum}"
        )
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    milestones = milestones_in_steps(
        cfg.optim.schedule,
        cfg.optim.step_size_epochs,
        cfg.optim.milestones_epochs,
        steps_per_epoch,
        total_steps,
    )
    global_batch = d.batch_size * world * accum

    # --- model, loss, optimizer, precision -----------------------------------------------------------
    model = build_model(
        cfg.model,
        num_classes,
        pretrained=cfg.pretrained,
        small_input_stem=cfg.small_input_stem,
        stem_stride=cfg.stem_stride,
        log=log.print,  # the "pretrained: ..." line, from rank 0 only
    )
    check_input_size(model, d.image_size, cfg.model)
    memory_format = torch.channels_last if channels_last.value else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    ema = build_ema(model, cfg.ema_half_life_epochs, steps_per_epoch, cfg.epochs)
    peak_lr = cfg.optim.lr or default_lr(cfg.optim.optimizer, pretrained=cfg.pretrained is not None)
    if cfg.optim.lr:
        lr_source = "--optim.lr or the preset"
    else:
        regime = "for fine-tuning" if cfg.pretrained else "from scratch"
        lr_source = f"{cfg.optim.optimizer} default {regime}"
    o = cfg.optim
    optimizer = build_optimizer(
        model, o.optimizer, lr=peak_lr, weight_decay=o.weight_decay, momentum=o.momentum, betas=o.betas
    )
    loss_weights = inverse_frequency_weights(counts["train"]).to(device) if d.class_weighted_loss else None
    # Logit adjustment: a fixed per-class vector added to the logits wherever they are judged or shipped.
    adjust = logit_bias(
        cfg.logit_adjustment, counts["train"], d.sampler_alpha if d.weighted_sampler else None, loss_weights
    )
    rare = rarest_classes(counts["train"])  # their recall goes next to top-1 in the log
    # Int labels: the plain nn.CrossEntropyLoss; MixUp/CutMix soft targets: the same weights and smoothing.
    criterion = build_criterion(weight=loss_weights, label_smoothing=o.label_smoothing)
    mixer = BatchMixer(
        num_classes, mixup_alpha=o.mixup_alpha, cutmix_alpha=o.cutmix_alpha, mix_prob=o.mix_prob
    )
    # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range and needs none. A
    # disabled scaler is a pass-through, so the step below has one path for every precision.
    scaler = torch.amp.GradScaler(device.type, enabled=precision.value == "fp16")
    amp_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision.value]
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=precision.value != "fp32")
    train_metrics = {name: m.to(device) for name, m in build_train_metrics(num_classes).items()}
    val_metrics = build_val_metrics(num_classes).to(device)

    # --- resume: every piece of state that decides what happens next --------------------------------
    step, start_epoch, batches_done = 0, 0, 0
    best = {
        "metric": cfg.select_metric,
        "value": float("-inf"),
        "epoch": -1,
        "kept": [],
    }  # kept: [[value, epoch], ...]
    weights_used = "ema" if ema is not None else "raw"  # which weights the last validation preferred
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        if ema is not None:
            ema.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        if scaler.is_enabled() and resumed["scaler"]:  # a disabled scaler saved {} (e.g. a CPU run)
            scaler.load_state_dict(resumed["scaler"])
        for name, metric in train_metrics.items():
            metric.load_state_dict(resumed["train_metrics"][name])
        step, start_epoch, batches_done, best = (
            resumed["step"],
            resumed["epoch"],
            resumed["batches_in_epoch"],
            resumed["best"],
        )
        weights_used = resumed["weights"]
        ckpt.restore_rng(resumed["rng"])
        log.print(
            f"resumed {run_dir} at epoch {start_epoch}, step {step} ({batches_done} batches into the epoch)"
        )

    # Wrap last: checkpoints and EMA always see the plain `model`; `net` is what the step calls.
    net = model
    if cfg.sync_batchnorm and dist_info.enabled:
        if device.type != "cuda":
            raise SystemExit(
                "error: --sync-batchnorm needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only)"
            )
        model = net = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps BN layers in place, same tensors
    if dist_info.enabled:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)

    # --- what the run directory holds before the first step ------------------------------------------
    ema_decay = decay_per_step(cfg.ema_half_life_epochs, steps_per_epoch) if ema is not None else None
    derived = dict(
        world_size=world,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        peak_lr=peak_lr,
        ema_decay_per_step=ema_decay,
        loss_class_weights=loss_weights.tolist() if loss_weights is not None else None,
        logit_bias=adjust.tolist() if adjust is not None else None,
    )
    resolved = {
        name: {"requested": requested[name], "value": c.value, "reason": c.reason}
        for name, c in choices.items()
    }
    if dist_info.is_main:
        save_json(
            cfg,
            run_dir / "config.json",
            derived=derived,
            resolved=resolved,
            machine=hardware.describe(),
            dataset=dataset,
            **environment(),
        )
        mapping = ckpt.labels_mapping(classes, preprocessing, cfg.model)
        ckpt.write_text(run_dir / "labels_mapping.json", json.dumps(mapping, indent=2) + "\n")
    log.print(
        f"run {run_dir} | {cfg.model} | {len(splits.train)} train / {len(splits.val)} val images | "
        f"global batch {global_batch} | {steps_per_epoch} steps/epoch | "
        f"peak lr {peak_lr:.1e} ({lr_source}) | {device} {precision.value}"
    )
    if (
        dist_info.is_main and resumed is None
    ):  # what the model sees; peek_batch draws from no RNG and no iterator
        plots.save_figure(
            plots.train_batch_figure(*peek_batch(train_loader, 64), classes, d.mean, d.std),
            run_dir / "plots" / "train_batch.png",
        )
    if cfg.debug:
        images, targets = next(
            iter(
                make_loader(
                    train_set, EpochSampler(len(train_set), shuffle=False), **loader_args, drop_last=True
                )
            )
        )
        first, last = overfit_one_batch(model, images.to(device), targets.to(device))
        fitted = last < 0.5 * first
        verdict = "ok" if fitted else "FAILED: the model cannot fit one batch, look for a bug upstream"
        log.print(f"debug: overfit one batch: loss {first:.3f} -> {last:.3f} in 30 steps: {verdict}")
        if not fitted and cfg.debug_overfit_failure == "stop":
            raise SystemExit(
                "error: --debug's overfit-one-batch check failed (above); fix the model or the data, "
                "or pass --debug-overfit-failure continue to train anyway"
            )

    def state(epoch: int, batches_in_epoch: int, val: dict | None, drawn: torch.Tensor) -> dict:
        """Everything for resume and for inference; plain data, loadable with weights_only=True."""
        return dict(
            model=model.state_dict(),
            ema=ema.state_dict() if ema is not None else None,
            optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict(),
            train_metrics={n: m.state_dict() for n, m in train_metrics.items()},
            epoch=epoch,
            batches_in_epoch=batches_in_epoch,
            step=step,
            best=best,
            rng=ckpt.rng_state(device),
            config=to_dict(cfg),
            classes=classes,
            preprocessing=preprocessing,
            model_name=cfg.model,
            weights=weights_used,
            val_metrics=val,
            drawn=drawn,
            dataset=dataset,
            logit_bias=adjust.tolist() if adjust is not None else None,
            precision=precision.value,
        )

    watch = NonFiniteWatch(device)
    skipped_nonfinite = 0  # --nonfinite-loss skip: batches left out
    scaler_skipped = 0  # fp16: optimizer steps the GradScaler skipped on overflowing gradients

    def stop_if_nonfinite() -> None:
        """A sync point. Called before anything is saved, so NaN weights never reach a checkpoint: a NaN
        loss stops here, and so do weights or BatchNorm statistics that became NaN/inf otherwise (a
        finite loss followed by an exploding step, say)."""
        bad = watch.first()
        if bad is None:
            broken = ckpt.nonfinite_tensors(model.state_dict(), ema.state_dict() if ema is not None else {})
            if broken:
                raise SystemExit(
                    f"error: after step {step} the weights hold NaN/inf ({', '.join(broken[:5])}"
                    f"{', ...' if len(broken) > 5 else ''}); they were not saved, the last checkpoint is "
                    "from before. Lower --optim.lr or set --optim.clip-grad-norm."
                )
            return
        bad_epoch, bad_batch = bad
        paths = [
            splits.train[i][0]
            for r in range(world)
            for i in train_sampler.batch_indices(bad_batch, d.batch_size, rank=r)
        ]
        if dist_info.is_main:
            ckpt.write_text(run_dir / "nonfinite_batch.txt", "\n".join(paths) + "\n")
        raise SystemExit(
            f"error: the loss became NaN/inf in epoch {bad_epoch}, batch {bad_batch} (near step {step}); "
            f"its files are listed in {run_dir / 'nonfinite_batch.txt'}. The last checkpoint is from "
            "before it. Lower --optim.lr, check those images, or pass --nonfinite-loss skip."
        )

    # --- the epochs ----------------------------------------------------------------------------------
    val = resumed.get("val_metrics") if resumed else None
    schedule = functools.partial(
        lr_at,
        peak_lr=peak_lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=o.min_lr_ratio,
        schedule=o.schedule,
        milestones=milestones,
        gamma=o.gamma,
    )
    lr = schedule(step)
    for epoch in range(start_epoch, cfg.epochs):
        train_sampler.set_epoch(epoch, start=batches_done * d.batch_size)
        net.train()
        drawn = torch.zeros(num_classes, dtype=torch.long)  # what the sampler actually delivered
        if resumed is not None and epoch == start_epoch and batches_done > 0 and dist_info.is_main:
            drawn = resumed[
                "drawn"
            ].clone()  # all ranks' counts so far in this epoch, summed: rank 0 holds them
        bar = tqdm(
            total=batches_per_epoch,
            initial=batches_done,
            desc=f"epoch {epoch}",
            disable=not (cfg.progress and dist_info.is_main),
            leave=False,
        )
        tick, images_since_tick = time.perf_counter(), 0
        for images, labels in itertools.islice(train_loader, batches_per_epoch - batches_done):
            drawn += torch.bincount(labels, minlength=num_classes)
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            # MixUp/CutMix: (N, C) soft targets from the global torch RNG (checkpointed); off: targets is labels.
            images, targets = mixer(images, labels)
            batches_done += 1
            is_last_micro = batches_done % accum == 0
            # DDP all-reduces gradients during backward; inner micro-batches only accumulate locally.
            # 'skip' keeps the BatchNorm statistics from before the forward: a NaN batch poisons them even
            # without a backward. It asks the host about every loss (a sync point); 'stop' never does.
            buffers = [b.clone() for b in model.buffers()] if cfg.nonfinite_loss == "skip" else []
            with net.no_sync() if dist_info.enabled and not is_last_micro else nullcontext():
                with autocast:
                    logits = net(images)
                    loss = criterion(logits, targets)
                if buffers and distributed.any_true(not torch.isfinite(loss).item(), device):
                    torch._foreach_copy_(list(model.buffers()), buffers)
                    skipped_nonfinite += 1  # no backward: this batch adds nothing to the gradients
                else:
                    scaler.scale(loss / accum).backward()
                    train_metrics["loss"].update(loss.detach().float(), weight=len(labels))
                    # Mixed batches: top-1 against the soft target's argmax (the larger share of the mix).
                    train_metrics["top1"].update(
                        logits.detach(), targets.argmax(dim=1) if mixer.enabled else labels
                    )
            if cfg.nonfinite_loss == "stop":  # every precision: the forward poisoned BatchNorm either way
                watch.update(loss, epoch, batches_done - 1)
            images_since_tick += len(labels)
            bar.update(1)
            if not is_last_micro:
                continue

            # One optimizer step: LR from the step, unscale, clip, step, EMA.
            lr = schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            if o.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad_norm)
            # fp16: the scaler skips the step when the scaled gradients overflowed (the loss was finite),
            # and halves its scale; expected now and then, so it is counted, not stopped on.
            scale = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(optimizer)
            scaler.update()
            if scale is not None and scaler.get_scale() < scale:
                scaler_skipped += 1
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(model)
            step += 1

            if step % cfg.log_every_steps == 0:
                stop_if_nonfinite()
                loss_value = loss.item()  # a sync point: only here, at log time
                rate = images_since_tick * world / (time.perf_counter() - tick)
                tick, images_since_tick = time.perf_counter(), 0
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", img_s=f"{rate:.0f}")
                skips = [f"{skipped_nonfinite} non-finite batches skipped"] if skipped_nonfinite else []
                skips += [f"{scaler_skipped} steps skipped by the fp16 GradScaler"] if scaler_skipped else []
                if not cfg.progress:
                    log.print(
                        f"step {step}/{total_steps} | epoch {epoch} | loss {loss_value:.4f} | lr {lr:.2e} | "
                        + " | ".join([f"{rate:.0f} img/s", *skips])
                    )
                counters = {"skipped_nonfinite": skipped_nonfinite, "scaler_skipped_steps": scaler_skipped}
                scalars = {"loss": loss_value, "lr": lr, "images_per_s": rate, **counters}
                log.scalars(step, scalars, prefix="train/")
            stopping = stop.requested(device)  # a signal: save where we are and leave
            if stopping or (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0):
                stop_if_nonfinite()
                drawn_so_far = distributed.all_reduce_sum(drawn.clone())
                if dist_info.is_main:
                    ckpt.save_checkpoint(
                        state(epoch, batches_done, val, drawn_so_far), run_dir / "checkpoints" / "last.pt"
                    )
            if stopping:
                log.print(
                    f"stopped at step {step} (epoch {epoch}); continue with: python train.py --resume {run_dir}"
                )
                raise SystemExit(stop.exit_code)
        bar.close()

        # --- end of epoch: train summary, validation, checkpoints ------------------------------------
        stop_if_nonfinite()
        batches_done = 0
        distributed.all_reduce_sum(drawn)
        if epoch == start_epoch:
            log.print(
                "images drawn per class this epoch: "
                + ", ".join(f"{c}={n}" for c, n in zip(classes, drawn.tolist(), strict=True))
            )
        train = {name: m.compute().item() for name, m in train_metrics.items()}  # syncs across ranks
        for metric in train_metrics.values():
            metric.reset()
        distributed.broadcast_buffers(model)
        if ema is not None:
            distributed.broadcast_buffers(ema)
        # Validate the EMA and the raw weights alike; the better one by select_metric is this epoch's result.
        candidates = {"ema": ema.module, "raw": model} if ema is not None else {"raw": model}
        results = {
            which: evaluate(
                m,
                val_loader,
                val_metrics,
                device=device,
                autocast=autocast,
                channels_last=channels_last.value,
                logit_bias=adjust.to(device) if adjust is not None else None,
            )
            for which, m in candidates.items()
        }
        weights_used = pick_weights(results, cfg.select_metric)
        val = results[weights_used]
        best, improved, dropped = update_best(best, val[cfg.select_metric], epoch, cfg.keep_best)
        other = "raw" if weights_used == "ema" else "ema"
        versus = (
            f" ({weights_used}; {other} {results[other][cfg.select_metric]:.4f})" if ema is not None else ""
        )
        log.print(
            f"epoch {epoch} | train loss {train['loss']:.4f} top1 {train['top1']:.4f} | val loss {val['loss']:.4f} top1 {val['top1']:.4f}"
            f" macro-F1 {val['macro_f1']:.4f}{versus}{rare_recall_text(val['per_class_acc'], classes, rare)}"
            f" | best {cfg.select_metric} {best['value']:.4f} (epoch {best['epoch']})"
        )
        log.epoch(
            {
                "epoch": epoch,
                "step": step,
                "lr": lr,
                "train": train,
                "val": val,
                "weights": weights_used,
                "drawn_per_class": drawn.tolist(),
                "skipped_nonfinite_batches": skipped_nonfinite,
                "scaler_skipped_steps": scaler_skipped,
                "val_by_weights": {
                    w: {k: r[k] for k in ("top1", "macro_f1", "balanced_accuracy", "loss")}
                    for w, r in results.items()
                },
            }
        )
        log.scalars(step, {k: v for k, v in train.items()}, prefix="train_epoch/")
        log.scalars(step, {k: v for k, v in val.items() if not isinstance(v, list)}, prefix="val/")
        log.scalars(
            step,
            {f"{which}_{cfg.select_metric}": r[cfg.select_metric] for which, r in results.items()},
            prefix="val_weights/",
        )
        log.scalars(step, {classes[c]: val["per_class_acc"][c] for c in rare}, prefix="val_recall_rare/")
        if dist_info.is_main:
            # best.safetensors holds the chosen weights with the logit adjustment folded into the head's bias.
            ckpt.save_epoch(
                run_dir,
                state(epoch + 1, 0, val, drawn),
                epoch,
                keep=any(e == epoch for _, e in best["kept"]),
                drop=[e for _, e in dropped],
                best_weights=fold_logit_bias(candidates[weights_used], adjust) if improved else None,
                best_metadata=ckpt.labels_mapping(
                    classes,
                    preprocessing,
                    cfg.model,
                    weights=weights_used,
                    epoch=epoch,
                    logit_adjustment=cfg.logit_adjustment,
                    small_input_stem=cfg.small_input_stem,
                    stem_stride=cfg.stem_stride,
                    data={"root": str(d.root), "val_fraction": d.val_fraction, "seed": cfg.seed},
                ),
            )
            plots.save_epoch_pictures(
                run_dir, val["confusion"], classes, log, step
            )  # after the checkpoints: a plot error costs none
        distributed.barrier()  # no rank races ahead of the checkpoint
        if stop.requested(device):
            log.print(f"stopped after epoch {epoch}; continue with: python train.py --resume {run_dir}")
            raise SystemExit(stop.exit_code)
        if cfg.early_stop_patience is not None and epoch - best["epoch"] >= cfg.early_stop_patience:
            log.print(f"early stop: no better val {cfg.select_metric} in {cfg.early_stop_patience} epochs")
            break

    # Temperature scaling on the val split with best.pt's weights: T goes into best.pt and the exports.
    calibrate_best(
        run_dir, val_loader, device=device, autocast=autocast, channels_last=channels_last.value, log=log
    )
    log.print(f"done: {run_dir} | best val {cfg.select_metric} {best['value']:.4f} at epoch {best['epoch']}")
    log.close()
    return {"run_dir": str(run_dir), "best": best, "val": val, "step": step, "model": model, "ema": ema}


if __name__ == "__main__":
    main(parse_cli(description=__doc__))
