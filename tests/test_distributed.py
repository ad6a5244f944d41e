"""DDP on CPU (gloo) through torchrun: identical weights on every rank, one writer, exact metrics, resume."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from classifier.checkpoint import load_checkpoint
from classifier.config import from_dict
from classifier.data import ImageDataset, build_splits, make_loader
from classifier.models import model_from_checkpoint
from classifier.sampling import EpochSampler
from classifier.transforms import eval_transform
from classifier.validation import build_val_metrics, validate

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(args, cwd, out_dir):
    import subprocess

    env = {**os.environ, "DDP_TEST_OUT": str(out_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*TORCHRUN, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


@pytest.fixture(scope="module")
def ddp_run(fmnist_small_root, tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("ddp")
    args = [
        "tests/ddp_worker.py",
        "--model",
        "resnet18",
        "--data.root",
        fmnist_small_root,
        "--out-dir",
        out / "runs",
        "--name",
        "ddp",
        "--epochs",
        "2",
        "--data.batch-size",
        "8",
        "--data.num-workers",
        "0",
        "--data.image-size",
        "32",
        "--data.resize-size",
        "32",
        "--data.weighted-sampler",
        "--optim.grad-accum-steps",
        "2",
        "--no-progress",
        "--log-every-steps",
        "2",
    ]
    proc = torchrun(args, repo_root, out)
    assert proc.returncode == 0
    return out, proc, args


def test_ranks_end_with_identical_weights(ddp_run):
    out, _, _ = ddp_run
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = load_checkpoint(out / "runs" / "ddp")["model"]
    assert all(torch.equal(saved[k], rank0[k]) for k in rank0)  # the checkpoint holds the unwrapped module


def test_only_rank_zero_writes_and_prints(ddp_run):
    out, proc, _ = ddp_run
    run = out / "runs" / "ddp"
    assert sorted(p.name for p in out.iterdir()) == ["rank0.pt", "rank1.pt", "runs"]
    assert [p.name for p in (out / "runs").iterdir()] == ["ddp"]
    assert len(list((run / "tensorboard").iterdir())) == 1  # one events file: one writer
    assert proc.stdout.count("imbalance ratio") == 1 and proc.stdout.count("done: ") == 1
    config = json.loads((run / "config.json").read_text())
    assert config["derived"]["world_size"] == 2 and config["derived"]["global_batch"] == 8 * 2 * 2
    assert (
        config["optim"]["lr"] is None and config["derived"]["peak_lr"] == 1e-3
    )  # not rescaled for the world size
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(records[0]["drawn_per_class"]) == 2 * 8 * (110 // 2 // 8)  # both ranks' draws, summed


def test_validation_metrics_equal_a_single_process_evaluation(ddp_run):
    out, _, _ = ddp_run
    checkpoint = load_checkpoint(out / "runs" / "ddp")
    cfg = from_dict(checkpoint["config"])
    model, _ = model_from_checkpoint(checkpoint)
    splits = build_splits(cfg.data.root, cfg.data.val_fraction, cfg.seed)
    dataset = ImageDataset(splits.val, eval_transform(checkpoint["preprocessing"]))
    loader = make_loader(
        dataset,
        EpochSampler(len(dataset), shuffle=False),
        batch_size=4,
        num_workers=0,
        drop_last=False,
        pin_memory=False,
    )
    single = validate(
        model,
        loader,
        build_val_metrics(10),
        device=torch.device("cpu"),
        autocast=torch.autocast("cpu", enabled=False),
    )
    ddp = checkpoint["val_metrics"]
    assert single["confusion"] == ddp["confusion"]  # same images, each counted once (val has an odd count)
    assert sum(map(sum, ddp["confusion"])) == len(splits.val)
    assert single["top1"] == pytest.approx(ddp["top1"], abs=1e-6)
    assert single["macro_auroc"] == pytest.approx(ddp["macro_auroc"], abs=1e-5)


def test_resume_under_ddp_matches_the_straight_run(ddp_run, repo_root, tmp_path):
    out, _, args = ddp_run
    # Take the epoch-0 state by re-running 1 epoch, then resume it to 2 epochs under torchrun.
    one = [*args]
    one[one.index("--epochs") + 1] = "1"
    one[one.index("--out-dir") + 1] = str(tmp_path / "runs")
    assert torchrun(one, repo_root, tmp_path).returncode == 0
    proc = torchrun(
        [
            "tests/ddp_worker.py",
            "--resume",
            tmp_path / "runs" / "ddp",
            "--epochs",
            "2",
            "--accept-config-changes",
        ],
        repo_root,
        tmp_path,
    )
    assert proc.returncode == 0
    straight, resumed = torch.load(out / "rank0.pt"), torch.load(tmp_path / "rank0.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    saved = [load_checkpoint(root / "ddp") for root in (out / "runs", tmp_path / "runs")]
    assert all(torch.equal(saved[0]["ema"][k], saved[1]["ema"][k]) for k in saved[0]["ema"])  # the EMA too
    # Epoch 1's record, including the per-class draw counts summed over ranks, is the straight run's too.
    records = [
        [json.loads(x) for x in (root / "ddp" / "metrics.jsonl").read_text().splitlines()]
        for root in (out / "runs", tmp_path / "runs")
    ]
    assert records[0][1] == records[1][1]
    shutil.rmtree(tmp_path / "runs")


def test_temperature_is_fitted_on_the_whole_val_split(ddp_run):
    """Each rank holds half the val logits (an odd count); gathered, they give the single-process fit."""
    from classifier.calibration import collect_logits, fit_temperature

    out, proc, _ = ddp_run
    best = load_checkpoint(out / "runs" / "ddp" / "checkpoints" / "best.pt")
    cfg = from_dict(best["config"])
    model, _ = model_from_checkpoint(best)
    splits = build_splits(cfg.data.root, cfg.data.val_fraction, cfg.seed)
    loader = make_loader(
        ImageDataset(splits.val, eval_transform(best["preprocessing"])),
        EpochSampler(len(splits.val), shuffle=False),
        batch_size=4,
        num_workers=0,
        drop_last=False,
        pin_memory=False,
    )
    logits, labels = collect_logits(
        model, loader, device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False)
    )
    assert best["temperature"] == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    assert proc.stdout.count("calibration: temperature") == 1  # every rank fits, rank 0 says so


def test_validation_loss_f1_and_balanced_accuracy_equal_a_single_process_evaluation(ddp_run):
    """The gathered val metrics the test above leaves out: the loss over every val image, and macro F1 and
    balanced accuracy from both ranks' predictions. Catches rank 0's numbers (half the images) reported
    as the split's. (The split has 10 images, 5 per rank, so a mean of rank means would pass too.)"""
    out, _, _ = ddp_run
    checkpoint = load_checkpoint(out / "runs" / "ddp")
    cfg = from_dict(checkpoint["config"])
    model, _ = model_from_checkpoint(checkpoint)
    val = build_splits(cfg.data.root, cfg.data.val_fraction, cfg.seed).val
    loader = make_loader(
        ImageDataset(val, eval_transform(checkpoint["preprocessing"])),
        EpochSampler(len(val), shuffle=False),
        batch_size=4,
        num_workers=0,
        drop_last=False,
        pin_memory=False,
    )
    single = validate(
        model,
        loader,
        build_val_metrics(10),
        device=torch.device("cpu"),
        autocast=torch.autocast("cpu", enabled=False),
    )
    for name in ("loss", "macro_f1", "balanced_accuracy"):
        assert checkpoint["val_metrics"][name] == pytest.approx(single[name], abs=1e-5), name


def test_sync_batchnorm_is_refused_on_cpu(fmnist_small_root, repo_root, tmp_path):
    """README: --sync-batchnorm is for GPUs. Under torchrun on CPU (gloo) every rank stops with an error
    naming the flag before anything is trained or written. Catches the flag silently ignored (training
    on with per-process BatchNorm statistics) or a crash inside SyncBatchNorm's CUDA-only kernels."""
    args = [
        "train.py",
        "--model",
        "small_resnet",
        "--data.root",
        fmnist_small_root,
        "--out-dir",
        tmp_path / "runs",
        "--name",
        "sbn",
        "--epochs",
        "1",
        "--data.image-size",
        "28",
        "--data.resize-size",
        "28",
        "--data.batch-size",
        "8",
        "--data.num-workers",
        "0",
        "--sync-batchnorm",
        "--no-progress",
    ]
    proc = torchrun(args, repo_root, tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("error: --sync-batchnorm needs CUDA devices") == 2  # each rank, by itself
    run = tmp_path / "runs" / "sbn"
    assert not (run / "config.json").exists() and not list(run.rglob("*.pt"))  # refused before the first step


def test_two_nodes_train_exactly_as_two_processes_on_one(ddp_run, repo_root, tmp_path):
    """Multi-node: two torchrun launches of one process each (--nnodes 2, a node rank each) rendezvous at
    one address, as on two machines. World size, global ranks and the data shards are the same as with
    two processes on one node, so the weights must be the single-node run's, bit for bit."""
    import socket
    import subprocess

    out, _, args = ddp_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        *args[: args.index("--out-dir")],
        "--out-dir",
        tmp_path / "runs",
        *args[args.index("--out-dir") + 2 :],
    ]
    nodes = []
    for node_rank in (0, 1):
        (tmp_path / f"node{node_rank}").mkdir()
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
        ]
        env = {**os.environ, "DDP_TEST_OUT": str(tmp_path / f"node{node_rank}"), "OMP_NUM_THREADS": "1"}
        nodes.append(
            subprocess.Popen(
                [*launch, *map(str, args)],
                cwd=repo_root,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    print(outputs[0][-3000:], outputs[1][-3000:])
    assert [node.returncode for node in nodes] == [0, 0]
    assert outputs[0].count("done: ") == 1 and "done: " not in outputs[1]  # global rank 0 alone prints
    assert (tmp_path / "node0" / "rank0.pt").is_file() and (tmp_path / "node1" / "rank1.pt").is_file()
    single, multi = load_checkpoint(out / "runs" / "ddp"), load_checkpoint(tmp_path / "runs" / "ddp")
    assert json.loads((tmp_path / "runs" / "ddp" / "config.json").read_text())["derived"]["world_size"] == 2
    for key in ("model", "ema"):
        assert all(torch.equal(single[key][k], multi[key][k]) for k in single[key]), key
