"""Train an image classifier on ImageFolder data. The loop is in train(), top to bottom.

    python train.py --model resnet50 --data.root DIR            # defaults
    python train.py --preset fashion-mnist --epochs 5           # a preset from configs/, overridden
    python train.py --resume runs/NAME                           # continue a run exactly where it stopped
    torchrun --nproc_per_node=2 train.py ...                     # DDP, one process per device

train() reads in order: set-up, data, derived numbers, model/optimizer/precision, resume, wrap, record
the run, the batch loop (the optimizer step inline), the end of each epoch, calibration and abstain
thresholds. main() only wraps it in signal handling and teardown. Lines tagged `# plumbing:` serve DDP,
signals or NaN checks and can be skipped on a first read.
"""

from __future__ import annotations

import functools
import itertools
import random
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from classifier import (
    audit,
    calibration,
    checkpoint,
    cli,
    data,
    distributed,
    fastdata,
    faults,
    finetune,
    groups,
    hardware,
    html_report,
    imbalance,
    label_issues,
    losses,
    lr_finder,
    model_card,
    models,
    optim,
    plots,
    resume,
    runlog,
    selection,
    trackers,
    transforms,
    unreadable,
    validation,
    video_augment,
)
from classifier.card import ModelCard
from classifier.checkpoint import TrainState
from classifier.config import TrainConfig, to_dict
from classifier.ema import build_ema, decay_per_step
from classifier.sampling import EpochSampler

DEBUG_TRAIN_BATCHES = 5  # --debug trains this many batches per epoch, unless --data.max-train-batches


def main(cfg: TrainConfig) -> dict:
    """Train with `cfg`. SIGINT/SIGTERM stop the run cleanly (see classifier/faults.py) while it runs.

    Whichever way train() leaves (done, an error, a NaN stop, a signal), `on_exit` first shuts down the
    data loaders' worker processes (faults.shutdown_workers says why that cannot wait for exit)."""
    stop = faults.StopRequest().install()
    try:
        with ExitStack() as on_exit:
            return train(cfg, stop, on_exit)
    finally:
        stop.uninstall()
        distributed.teardown()


def train(cfg: TrainConfig, stop: faults.StopRequest, on_exit: ExitStack) -> dict:
    """One run, in the order the module docstring gives. `stop` is polled at step boundaries; `on_exit`
    collects what must be undone however the run ends. Returns the run directory, the best record, the
    last validation's metrics, the step count, the model and its EMA (for callers and tests)."""
    # --- set-up --------------------------------------------------------------------------------------
    dist_info, device = distributed.setup(cfg.device)
    world = dist_info.world_size
    resumed = None
    if cfg.find_lr and cfg.resume is not None:
        raise SystemExit("error: --find-lr scans from the initial weights; it does not take --resume")
    try:  # flag values out of their range stop the run before anything is written
        finetune.check_multipliers(
            backbone_lr_mult=cfg.optim.backbone_lr_mult, layer_decay=cfg.optim.layer_decay
        )
        video_augment.check_probabilities(**transforms.video_degradations(cfg.data))
        tracker_names = trackers.parse_names(cfg.log)  # also: are W&B / MLflow installed, if chosen
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if cfg.resume is not None:
        resumed = checkpoint.load_checkpoint(cfg.resume)
        resume.check_resumable(resumed, resumed["loaded_from"])
    run_dir = cli.run_directory(cfg, resumed)
    distributed.barrier()  # every rank has checked the run directory before rank 0 writes into it
    if dist_info.is_main:
        cli.check_writable(run_dir)
    # Finishes the trackers' runs however train() ends; they open once config.json is written.
    log = runlog.RunLog(run_dir, tracker_names, cfg.tracking) if dist_info.is_main else runlog.NullLog()
    on_exit.enter_context(log)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    on_exit.callback(torch.autograd.set_detect_anomaly, torch.is_anomaly_enabled())  # as it was, after
    torch.autograd.set_detect_anomaly(cfg.debug)  # slow; names the op that produced a NaN gradient

    # 'auto' settings resolved for this machine (classifier/hardware.py); each choice and its reason is
    # printed here and written to config.json.
    choices = hardware.resolve_settings(cfg, device)
    for name, choice in choices.items():
        log.print(choice.line(name))
    precision = choices["precision"].value  # 'fp32', 'bf16' or 'fp16'
    channels_last = choices["channels_last"].value
    num_workers = choices["num_workers"].value  # validation's loader, the image scan, the fast path's decode
    if resumed is not None:
        resume.check_resumed_precision(resumed, precision, cfg.accept_config_changes)
        resume.check_resumed_rng(resumed, cfg.accept_config_changes)

    # --- data: one class mapping from train/, separate datasets per split ----------------------------
    splits, counts, data_fingerprint = read_data(cfg, resumed, dist_info, run_dir, num_workers, log)
    classes, num_classes = splits.classes, len(splits.classes)
    preprocessing = transforms.preprocessing_for(cfg.data)  # what evaluation and the export do too
    train_set = data.ImageDataset(splits.train, transforms.augmentation_for(cfg.data))
    val_set = data.ImageDataset(splits.val, transforms.eval_transform(preprocessing))
    sample_weights = None
    if cfg.data.weighted_sampler:  # rarer classes drawn more often (--data.sampler-alpha)
        train_labels = torch.tensor([label for _, label in splits.train])
        sample_weights = imbalance.sampler_weights(train_labels, counts["train"], cfg.data.sampler_alpha)
    train_sampler = EpochSampler(
        len(train_set),
        shuffle=True,
        seed=cfg.seed,
        weights=sample_weights,
        rank=dist_info.rank,
        world_size=world,
    )
    val_sampler = EpochSampler(len(val_set), shuffle=False, rank=dist_info.rank, world_size=world)
    # --debug loads in this process (0 workers), where breakpoints in data code work.
    workers = 0 if cfg.debug else num_workers
    train_workers = 0 if cfg.debug else choices["train_loader_workers"].value
    loader_args = dict(batch_size=cfg.data.batch_size, pin_memory=device.type == "cuda")
    if cfg.data.fast_path:  # decoded once into tensors, augmented a batch at a time on the device
        train_loader, val_loader = fastdata.make_tensor_loaders(
            splits,
            train_sampler,
            val_sampler,
            cfg.data,
            preprocessing,
            device=device,
            channels_last=channels_last,
            workers=workers,
            progress=cfg.progress and dist_info.is_main,
        )
    else:
        train_loader = data.make_loader(
            train_set, train_sampler, num_workers=train_workers, drop_last=True, **loader_args
        )
        val_loader = data.make_loader(
            val_set, val_sampler, num_workers=workers, drop_last=False, **loader_args
        )
    on_exit.callback(faults.shutdown_workers, train_loader)
    on_exit.callback(faults.shutdown_workers, val_loader)

    # --- derived numbers: computed once, never written back into cfg ---------------------------------
    accum = cfg.optim.grad_accum_steps
    batch_cap = cfg.data.max_train_batches
    if batch_cap is not None and batch_cap < 1:
        raise SystemExit(f"error: --data.max-train-batches {batch_cap}: must be at least 1 (or None)")
    if batch_cap is None and cfg.debug:
        batch_cap = DEBUG_TRAIN_BATCHES
    batches_per_epoch = len(train_sampler) // cfg.data.batch_size  # micro-batches, per process
    if batch_cap is not None:
        batches_per_epoch = min(batches_per_epoch, batch_cap)
    steps_per_epoch = batches_per_epoch // accum  # optimizer steps
    if steps_per_epoch == 0:
        raise SystemExit(
            f"error: {len(train_sampler)} training images per process cannot fill one optimizer step of "
            f"--data.batch-size {cfg.data.batch_size} x --optim.grad-accum-steps {accum}"
        )
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    freeze_steps = round(cfg.freeze_epochs * steps_per_epoch)  # head first: steps before the unfreeze
    check_freeze(cfg.freeze_epochs, freeze_steps, total_steps, cfg.epochs, cfg.pretrained)
    milestones = optim.milestones_in_steps(  # counted from the unfreeze (from step 0 without freezing)
        cfg.optim.schedule,
        cfg.optim.step_size_epochs,
        cfg.optim.milestones_epochs,
        steps_per_epoch,
        total_steps - freeze_steps,
    )
    global_batch = cfg.data.batch_size * world * accum  # images per optimizer step, all processes

    # --- model, loss, optimizer, precision -----------------------------------------------------------
    model = models.build_model(
        cfg.model,
        num_classes,
        pretrained=cfg.pretrained,
        small_input_stem=cfg.small_input_stem,
        stem_stride=cfg.stem_stride,
        log=log.print,  # the "pretrained: ..." line, from rank 0 only
    )
    models.check_input_size(model, cfg.data.image_size, cfg.model)
    # Parameters and FLOPs for the run line: one forward on meta tensors (no arithmetic, no RNG, the
    # weights untouched), which forward hooks on the model do see.
    model_size = model_card.size_text(model, cfg.data.image_size)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    ema = build_ema(model, cfg.ema_half_life_epochs, steps_per_epoch, cfg.epochs)
    peak_lr, lr_source = optim.peak_lr(cfg.optim, fine_tuning=cfg.pretrained is not None)
    optimizer = optim.build_optimizer(
        model,
        cfg.optim.optimizer,
        lr=peak_lr,
        weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum,
        betas=cfg.optim.betas,
        backbone_lr_mult=cfg.optim.backbone_lr_mult,
        layer_decay=cfg.optim.layer_decay,
    )
    lr_multipliers = {group["stage"]: group["lr_mult"] for group in optimizer.param_groups}
    if set(lr_multipliers.values()) != {1.0}:  # discriminative LRs: which stage got which fraction
        log.print(finetune.describe_multipliers(list(lr_multipliers), list(lr_multipliers.values())))
    loss_weights = None
    if cfg.data.class_weighted_loss:
        loss_weights = imbalance.inverse_frequency_weights(counts["train"]).to(device)
    # Logit adjustment: a fixed per-class vector added to the logits wherever they are judged or shipped.
    adjust = imbalance.logit_bias(
        cfg.logit_adjustment,
        counts["train"],
        cfg.data.sampler_alpha if cfg.data.weighted_sampler else None,
        loss_weights,
    )
    rare = imbalance.rarest_classes(counts["train"])  # their recall goes next to top-1 in the log
    # Int labels: the plain nn.CrossEntropyLoss; MixUp/CutMix soft targets: the same weights and smoothing.
    criterion = losses.build_criterion(weight=loss_weights, label_smoothing=cfg.optim.label_smoothing)
    mixer = losses.BatchMixer(
        num_classes,
        mixup_alpha=cfg.optim.mixup_alpha,
        cutmix_alpha=cfg.optim.cutmix_alpha,
        mix_prob=cfg.optim.mix_prob,
    )
    # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range and needs none. A
    # disabled scaler is a pass-through, so the step below has one path for every precision.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=precision != "fp32")
    train_metrics = {name: m.to(device) for name, m in validation.build_train_metrics(num_classes).items()}
    val_metrics = validation.build_val_metrics(num_classes).to(device)

    # --- resume: every piece of state that decides what happens next --------------------------------
    if resumed is not None:
        state = checkpoint.restore(
            resumed,
            model=model,
            ema=ema,
            optimizer=optimizer,
            scaler=scaler,
            train_metrics=train_metrics,
            holds_drawn=dist_info.is_main,  # rank 0 saved all ranks' counts, summed
        )
        log.print(
            f"resumed {run_dir} at epoch {state.epoch}, step {state.step} "
            f"({state.batches_in_epoch} batches into the epoch)"
        )
    else:
        state = TrainState(
            best=selection.no_best(cfg.select_metric),
            weights="ema" if ema is not None else "raw",
            drawn=torch.zeros(num_classes, dtype=torch.long),
        )

    # Head first (--freeze-epochs): the backbone gets no gradients until step freeze_steps.
    backbone_frozen = state.step < freeze_steps
    finetune.set_backbone_trainable(model, not backbone_frozen)
    if backbone_frozen:
        log.print(
            f"head first: only {models.head_name(model)} trains until step {freeze_steps} "
            f"(--freeze-epochs {cfg.freeze_epochs}); the backbone and its BatchNorm statistics are frozen"
        )

    # Wrap last: checkpoints and EMA always see the plain `model`; `net` is what the step calls.
    if cfg.sync_batchnorm and dist_info.enabled:
        if device.type != "cuda":
            raise SystemExit(
                "error: --sync-batchnorm needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only)"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps BN layers in place, same tensors
    wrap = functools.partial(wrap_model, ddp=dist_info.enabled, device=device, compile=cfg.compile)
    net = wrap(model)

    if cfg.find_lr:  # the LR range test instead of training; it writes no checkpoint
        return find_lr(
            net,
            train_loader,
            criterion=criterion,
            optimizer=optimizer,
            device=device,
            precision=precision,
            autocast=autocast,
            memory_format=memory_format,
            run_dir=run_dir,
            log=log,
        )

    # --- record the run: what its directory holds before the first step ------------------------------
    card = ModelCard.for_run(cfg, classes, preprocessing)
    run_facts = {  # what every checkpoint carries besides the training state
        "config": to_dict(cfg),
        "classes": classes,
        "preprocessing": preprocessing,
        "model_name": cfg.model,
        "dataset": data_fingerprint,
        "logit_bias": adjust.tolist() if adjust is not None else None,
        "precision": precision,
    }
    checkpoint_of = functools.partial(
        checkpoint.make_state,
        model=model,
        ema=ema,
        optimizer=optimizer,
        scaler=scaler,
        train_metrics=train_metrics,
        run_facts=run_facts,
        device=device,
    )
    ema_decay = decay_per_step(cfg.ema_half_life_epochs, steps_per_epoch) if ema is not None else None
    if dist_info.is_main:
        config_record = runlog.record_start(
            run_dir,
            cfg,
            card,
            derived={
                "world_size": world,
                "global_batch": global_batch,
                "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps,
                "warmup_steps": warmup_steps,
                "freeze_steps": freeze_steps,
                "peak_lr": peak_lr,
                "lr_multipliers": lr_multipliers,
                "ema_decay_per_step": ema_decay,
                "loss_class_weights": loss_weights.tolist() if loss_weights is not None else None,
                "logit_bias": run_facts["logit_bias"],
            },
            resolved=hardware.settings_record(cfg, choices),
            machine=hardware.describe(),
            dataset=data_fingerprint,
        )
        log.start(config_record)
    log.print(
        f"run {run_dir} | {cfg.model} ({model_size}) | "
        f"{len(splits.train)} train / {len(splits.val)} val images | "
        f"global batch {global_batch} | {steps_per_epoch} steps/epoch | "
        f"peak lr {peak_lr:.1e} ({lr_source}) | {device} {precision}"
    )
    if dist_info.is_main and resumed is None:  # what the model sees; draws from no RNG and no iterator
        images, labels = data.peek_batch(train_loader, 64)
        figure = plots.train_batch_figure(images, labels, classes, cfg.data.mean, cfg.data.std)
        plots.save_figure(figure, run_dir / "plots" / "train_batch.png")
        log.figure("train/batch", figure, 0)
    if cfg.debug:  # can the model fit one fixed batch? A copy trains; the run is untouched.
        first_batch = EpochSampler(len(train_set), shuffle=False)
        one_batch = data.make_loader(
            train_set, first_batch, num_workers=train_workers, drop_last=True, **loader_args
        )
        images, labels = next(iter(one_batch))
        faults.check_overfits(
            model, images.to(device), labels.to(device), cfg.debug_overfit_failure, log.print
        )

    # --- the epochs ----------------------------------------------------------------------------------
    # plumbing: NaN checks. A sync point, called before anything is saved, so NaN weights never reach a
    # checkpoint: it stops on a NaN loss (naming the batch's files) or NaN/inf weights.
    watch = faults.NonFiniteWatch(device)  # the first NaN loss, remembered on the device: no sync
    raise_if_nonfinite = functools.partial(
        faults.raise_if_nonfinite,
        watch,
        modules=[model, ema] if ema is not None else [model],
        sampler=train_sampler,
        samples=splits.train,
        batch_size=cfg.data.batch_size,
        report=run_dir / "nonfinite_batch.txt",
        write_report=dist_info.is_main,
    )
    skip_nonfinite = cfg.nonfinite_loss == "skip"
    lr_schedule = functools.partial(
        optim.lr_at,
        peak_lr=peak_lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps - freeze_steps,
        min_lr_ratio=cfg.optim.min_lr_ratio,
        schedule=cfg.optim.schedule,
        milestones=milestones,
        gamma=cfg.optim.gamma,
    )
    if freeze_steps > 0:  # the head alone (warmup, then the peak LR), then the schedule above afresh
        lr_schedule = functools.partial(
            optim.head_first_lr_at,
            freeze_steps=freeze_steps,
            warmup_steps=warmup_steps,
            peak_lr=peak_lr,
            then=lr_schedule,
        )
    validate = functools.partial(
        validation.validate,
        loader=val_loader,
        metrics=val_metrics,
        device=device,
        autocast=autocast,
        channels_last=channels_last,
        logit_bias=adjust.to(device) if adjust is not None else None,
    )
    lr = lr_schedule(state.step)
    first_epoch = state.epoch
    for epoch in range(first_epoch, cfg.epochs):
        state.epoch = epoch
        if state.batches_in_epoch == 0:
            state.drawn = torch.zeros(num_classes, dtype=torch.long)  # what the sampler actually delivers
        train_sampler.set_epoch(epoch, start=state.batches_in_epoch * cfg.data.batch_size)
        net.train()
        if backbone_frozen or cfg.freeze_bn_stats:  # BatchNorm statistics as loaded
            finetune.freeze_batchnorm_stats(model)
        bar = tqdm(
            total=batches_per_epoch,
            initial=state.batches_in_epoch,
            desc=f"epoch {epoch}",
            disable=not (cfg.progress and dist_info.is_main),
            leave=False,
        )
        tick, images_since_tick = time.perf_counter(), 0
        for images, labels in itertools.islice(train_loader, batches_per_epoch - state.batches_in_epoch):
            if backbone_frozen and state.step == freeze_steps:  # head first: now everything trains
                backbone_frozen = False
                finetune.set_backbone_trainable(model, True)
                model.train()
                if cfg.freeze_bn_stats:
                    finetune.freeze_batchnorm_stats(model)
                net = wrap(model)  # DDP registers the parameters that need gradients when it is built
                log.print(f"step {state.step}: backbone unfrozen, the LR schedule starts again")
            state.drawn += torch.bincount(labels, minlength=num_classes)
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            # MixUp/CutMix draw from the global torch RNG, which checkpoints carry.
            images, targets = mixer(images, labels)  # targets: (N,) labels, or (N, C) soft when mixing
            state.batches_in_epoch += 1
            last_micro = state.batches_in_epoch % accum == 0

            # forward and backward; DDP all-reduces the gradients only in the last micro-batch's backward
            sync = nullcontext() if last_micro or not dist_info.enabled else net.no_sync()
            # 'skip' keeps the BatchNorm statistics from before the forward: a NaN batch poisons them
            # even without a backward.
            snapshot = faults.BufferSnapshot(model) if skip_nonfinite else None
            with sync:
                with autocast:
                    logits = net(images)  # (N, num_classes)
                    loss = criterion(logits, targets)
                if snapshot is not None and faults.nonfinite_on_any_rank(loss, device):  # a sync point
                    snapshot.restore()
                    state.skipped_nonfinite += 1  # no backward: this batch adds nothing to the gradients
                else:
                    scaler.scale(loss / accum).backward()
                    train_metrics["loss"].update(loss.detach().float(), weight=len(labels))
                    # Mixed batches: top-1 against the soft target's argmax (the larger share of the mix).
                    top1_target = targets.argmax(dim=1) if mixer.enabled else labels
                    train_metrics["top1"].update(logits.detach(), top1_target)
            if cfg.nonfinite_loss == "stop":  # every precision: the forward poisoned BatchNorm either way
                watch.update(loss, epoch, state.batches_in_epoch - 1)  # plumbing: NaN checks, no sync
            images_since_tick += len(labels)
            bar.update(1)
            if not last_micro:
                continue

            # One optimizer step.
            # set the learning rate: a pure function of the step count
            lr = lr_schedule(state.step)
            optim.set_lr(optimizer, lr)
            # fp16: unscale, so that the clip sees the true gradients (a no-op for the disabled scaler)
            scaler.unscale_(optimizer)
            if cfg.optim.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
            # step. fp16: the scaler skips the step when the scaled gradients overflowed (the loss was
            # finite) and halves its scale; that is expected now and then, so it is counted, not stopped on.
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(optimizer)
            scaler.update()
            if scale_before is not None and scaler.get_scale() < scale_before:
                state.scaler_skipped += 1
            # free the gradients' memory until the next backward
            optimizer.zero_grad(set_to_none=True)
            # the EMA follows the raw weights, one update per optimizer step
            if ema is not None:
                ema.update_parameters(model)
            state.step += 1

            if state.step % cfg.log_every_steps == 0:
                raise_if_nonfinite(step=state.step)
                loss_value = loss.item()  # a sync point: only here, at log time
                rate = images_since_tick * world / (time.perf_counter() - tick)
                tick, images_since_tick = time.perf_counter(), 0
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", img_s=f"{rate:.0f}")
                if not cfg.progress:
                    log.print(runlog.step_line(state, total_steps, loss_value, lr, rate))
                log.scalars(state.step, runlog.step_scalars(state, loss_value, lr, rate))
            # plumbing: signals. An all-reduce under DDP, so that every rank stops at the same step.
            stopping = stop.requested(device)
            every = cfg.checkpoint_every_steps
            if stopping or (every and state.step % every == 0):
                raise_if_nonfinite(step=state.step)
                drawn_so_far = distributed.all_reduce_sum(state.drawn.clone())
                if dist_info.is_main:
                    last = checkpoint_of(state, drawn=drawn_so_far)
                    checkpoint.save_checkpoint(last, run_dir / "checkpoints" / "last.pt")
            if stopping:
                log.print(
                    f"stopped at step {state.step} (epoch {epoch}); "
                    f"continue with: python train.py --resume {run_dir}"
                )
                raise SystemExit(stop.exit_code)
        bar.close()

        # --- end of epoch: train summary, validation, checkpoints ------------------------------------
        raise_if_nonfinite(step=state.step)
        distributed.all_reduce_sum(state.drawn)  # every rank's counts, summed in place
        if epoch == first_epoch:
            drawn_text = ", ".join(f"{c}={n}" for c, n in zip(classes, state.drawn.tolist(), strict=True))
            log.print(f"images drawn per class this epoch: {drawn_text}")
        train_summary = {name: m.compute().item() for name, m in train_metrics.items()}  # syncs ranks
        for metric in train_metrics.values():
            metric.reset()
        distributed.broadcast_buffers(model)
        if ema is not None:
            distributed.broadcast_buffers(ema)
        # Validate the EMA and the raw weights alike; the better one by select_metric is this epoch's.
        candidates = {"ema": ema.module, "raw": model} if ema is not None else {"raw": model}
        results = {which: validate(weights) for which, weights in candidates.items()}
        state.weights = selection.pick_weights(results, cfg.select_metric)
        state.val = results[state.weights]
        state.best, improved, dropped = selection.update_best(
            state.best, state.val[cfg.select_metric], epoch, cfg.keep_best
        )
        record = runlog.epoch_record(state, lr, train_summary, results)
        log.print(runlog.epoch_line(record, state.best, classes, rare))
        log.epoch(record)  # metrics.jsonl
        log.scalars(state.step, runlog.epoch_scalars(record, cfg.select_metric, classes, rare))

        state.epoch, state.batches_in_epoch = epoch + 1, 0  # where a resume from these files starts
        if dist_info.is_main:
            # best.safetensors holds the chosen weights with the logit adjustment folded into the bias.
            best_weights = None
            if improved:
                best_weights = models.fold_logit_bias(candidates[state.weights], adjust)
            checkpoint.save_epoch(
                run_dir,
                checkpoint_of(state, drawn=state.drawn),
                epoch,
                keep=any(kept_epoch == epoch for _, kept_epoch in state.best["kept"]),
                drop=[dropped_epoch for _, dropped_epoch in dropped],
                best_weights=best_weights,
                best_metadata=card.chosen(weights=state.weights, epoch=epoch).to_mapping(),
            )
            # after the checkpoints: a plot error costs none
            plots.save_epoch_pictures(run_dir, state.val["confusion"], classes, log, state.step)
        distributed.barrier()  # no rank races ahead of the checkpoint
        if stop.requested(device):  # plumbing: signals
            log.print(f"stopped after epoch {epoch}; continue with: python train.py --resume {run_dir}")
            raise SystemExit(stop.exit_code)
        patience = cfg.early_stop_patience
        if patience is not None and epoch - state.best["epoch"] >= patience:
            log.print(f"early stop: no better val {cfg.select_metric} in {patience} epochs")
            break

    # Temperature scaling on the val split with best.pt's weights, then the abstain thresholds per target
    # accuracy on the calibrated probabilities: both into best.pt and best.safetensors, so they travel to
    # the exports and predict.py --target-accuracy.
    calibration.calibrate_best(run_dir, val_loader, device=device, channels_last=channels_last, log=log)
    if dist_info.is_main:  # report.html: the best epoch's validation on one page
        html_report.write_run_report(run_dir)
    # The label-issue queue: the training images as validation sees them (no augmentation), in file order.
    if cfg.label_issues and not cfg.debug:
        train_as_val = data.ImageDataset(splits.train, transforms.eval_transform(preprocessing))
        in_order = EpochSampler(len(train_as_val), shuffle=False, rank=dist_info.rank, world_size=world)
        queue_loader = data.make_loader(
            train_as_val, in_order, num_workers=workers, drop_last=False, **loader_args
        )
        on_exit.callback(faults.shutdown_workers, queue_loader)
        label_issues.queue_training_images(
            run_dir,
            splits.train,
            classes,
            queue_loader,
            groups=splits.groups,
            device=device,
            autocast=autocast,
            channels_last=channels_last,
            log=log,
        )
    log.artifacts(runlog.final_artifacts(run_dir))
    log.print(
        f"done: {run_dir} | best val {cfg.select_metric} {state.best['value']:.4f} "
        f"at epoch {state.best['epoch']}"
    )
    return {
        "run_dir": str(run_dir),
        "best": state.best,
        "val": state.val,
        "step": state.step,
        "model": model,
        "ema": ema,
    }


def read_data(
    cfg: TrainConfig,
    resumed: dict | None,
    dist_info: distributed.DistInfo,
    run_dir: Path,
    workers: int,
    log: runlog.RunLog,
) -> tuple[data.Splits, dict[str, torch.Tensor], dict]:
    """The run's files, checked: (splits, images per class per split, the files' fingerprint).

    The class order comes from train/'s folders, or from the resumed run. With --data.scan-images every
    file is decoded once now, on `workers` processes, rather than crash a loader worker in epoch 3. A
    resume on changed files is refused (resume.check_resumed_files). Prints the class table."""
    try:
        splits = data.build_splits(
            cfg.data.root,
            cfg.data.val_fraction,
            cfg.seed,
            classes=resumed["classes"] if resumed is not None else None,
            group_pattern=cfg.data.group_pattern,
        )
    except (FileNotFoundError, ValueError) as err:  # each names the root, folder, row or class at fault
        raise SystemExit(f"error: {err}") from None
    if splits.groups:
        check_group_overlap(splits, strict=cfg.data.strict_groups, log=log.print)
    if not distributed.all_equal(splits.classes):
        raise SystemExit(
            f"error: the ranks read different class folders from {cfg.data.root}; "
            "is it the same data on every node?"
        )
    if cfg.data.scan_images:
        splits = unreadable.drop_unreadable(
            splits,
            cfg.data.root,
            skip=cfg.data.skip_bad_images,
            workers=max(1, workers),
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            report=run_dir / "bad_images.txt" if dist_info.is_main else None,
            log=log.print,
        )
    num_classes = len(splits.classes)
    counts = {
        name: data.class_counts(getattr(splits, name), num_classes) for name in ("train", "val", "test")
    }
    fingerprint = data.fingerprint(splits)
    if resumed is not None:
        resume.check_resumed_files(
            resumed,
            fingerprint,
            cfg.data.root,
            cfg.accept_config_changes,
            log=log.print,
        )
    log.print(runlog.class_table(splits.classes, counts))
    if cfg.data.audit and not cfg.find_lr and dist_info.is_main:
        # Near-twin images across the splits: the summary is logged, the pairs go to RUN/audit/.
        audit_dir = run_dir / "audit"
        same_files = resumed is not None and resumed["dataset"] == fingerprint
        if same_files and (audit_dir / "summary.json").is_file():
            log.print(f"audit: unchanged since the run started, on the same files ({audit_dir})")
        else:
            audit.run_audit(
                splits,
                audit_dir,
                threshold=cfg.data.audit_threshold,
                workers=max(1, workers),
                log=log.print,
            )
    distributed.barrier()  # the other ranks wait for the audit
    return splits, counts, fingerprint


def check_freeze(
    freeze_epochs: float, freeze_steps: int, total_steps: int, epochs: int, pretrained: str | None
) -> None:
    """--freeze-epochs must leave steps to train the whole network, and needs a pretrained backbone (a
    frozen random one is only noise under the head)."""
    if freeze_epochs < 0 or (freeze_epochs > 0 and freeze_steps >= total_steps):
        raise SystemExit(
            f"error: --freeze-epochs {freeze_epochs}: must be at least 0 and below --epochs {epochs}"
        )
    if freeze_epochs > 0 and freeze_steps == 0:
        raise SystemExit(
            f"error: --freeze-epochs {freeze_epochs} is less than one optimizer step "
            f"({total_steps // epochs} steps per epoch): give more, or 0 for no freezing"
        )
    if freeze_epochs > 0 and pretrained is None:
        raise SystemExit(
            f"error: --freeze-epochs {freeze_epochs} freezes a random backbone: give --pretrained "
            "(torchvision's DEFAULT or a weights file), or leave --freeze-epochs at 0"
        )


def wrap_model(model: nn.Module, *, ddp: bool, device: torch.device, compile: bool) -> nn.Module:
    """What the step calls: `model` under DDP (over the parameters that need gradients now) and/or
    torch.compile. Checkpoints and the EMA keep using the plain `model`."""
    net = model
    if ddp:
        device_ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
    if compile:
        net = torch.compile(net)
    return net


def find_lr(
    net: nn.Module,
    train_loader,
    *,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: str,
    autocast: torch.autocast,
    memory_format: torch.memory_format,
    run_dir: Path,
    log,
) -> dict:
    """--find-lr: the LR range test (classifier/lr_finder.py) with this run's data, model, loss and
    optimizer, instead of training. Writes lr_find.png, .csv and .json to `run_dir` (NAME-lr-find)."""
    if precision == "fp16":
        raise SystemExit("error: --find-lr runs without loss scaling: use --precision bf16 or fp32")
    batches = itertools.chain.from_iterable(itertools.repeat(train_loader))  # the loader, over and over
    net.train()
    step = lr_finder.make_step(
        net,
        batches,
        criterion,
        optimizer,
        device=device,
        autocast=autocast,
        set_lr=optim.set_lr,
        memory_format=memory_format,
    )
    curve = lr_finder.range_test(step)
    suggestion, rule = lr_finder.suggest_lr(curve)
    if distributed.is_main():
        lr_finder.write_results(run_dir, curve, suggestion, rule)
    log.print(
        f"LR range test: {len(curve.lrs)} steps from {curve.lrs[0]:.1e} to {curve.lrs[-1]:.1e} "
        f"({curve.stopped}); suggested --optim.lr {suggestion:.2e} ({rule}); see {run_dir / 'lr_find.png'}"
    )
    return {"run_dir": run_dir, "suggested_lr": suggestion, "curve": curve}


def check_group_overlap(splits: data.Splits, *, strict: bool, log) -> None:
    """Log the number of groups, and any group with images both in train and in val or test: frames of
    one track on both sides make validation measure memory. With `strict`, such a group stops the run."""
    every = splits.train + splits.val + splits.test
    log(f"groups: {len({splits.groups[path] for path, _ in every})} (train, val and test together)")
    for name in ("val", "test"):
        found = groups.overlap(splits.train, getattr(splits, name), splits.groups)
        if found["groups"] == 0:
            continue
        if strict:
            raise SystemExit(f"error: {groups.overlap_line(name, found)} (--data.strict-groups)")
        log(f"WARNING: {groups.overlap_line(name, found)}; --data.strict-groups makes this an error")


if __name__ == "__main__":
    main(cli.parse_cli(description=__doc__))
