"""Checkpoint files: atomic writes, weights-only loading, RNG state."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from classifier import checkpoint as ckpt
from classifier import files


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint({"step": 1}, path)

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkp")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, crash)
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_corrupt_and_foreign_files_are_named(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint({"step": 1}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="last.pt"):
        ckpt.load_checkpoint(path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not a classifier-training checkpoint"):
        ckpt.load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="checkpoints/last.pt"):
        ckpt.load_checkpoint(tmp_path)  # a run directory without checkpoints


class RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    legacy = tmp_path / "evil-legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump({"format": ckpt.FORMAT, "payload": RunsCode()}, f, protocol=2)
    zipped = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "payload": RunsCode()}, zipped)  # torch's own zip format
    for path in (legacy, zipped):
        with pytest.raises(ValueError, match=path.name):
            ckpt.load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt.save_checkpoint({"rng": ckpt.rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng(ckpt.load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_safetensors_with_metadata(tmp_path):
    from safetensors import safe_open

    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    ckpt.save_safetensors(
        conv.state_dict(), tmp_path / "w.safetensors", {"classes": ["a", "b"], "model": "x"}
    )
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert f.metadata() == {"classes": '["a", "b"]', "model": "x"}
        assert torch.equal(f.get_tensor("weight"), conv.weight)


def test_make_state_and_restore_round_trip_the_train_state(tmp_path):
    """Everything the loop keeps in TrainState comes back from a saved checkpoint; skip counts that a
    checkpoint lacks come back as 0, not as a KeyError."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = ckpt.TrainState(
        best={"metric": "top1", "value": 0.5, "epoch": 1, "kept": []},
        weights="raw",
        drawn=torch.tensor([3, 0, 5]),
        step=7,
        epoch=2,
        batches_in_epoch=4,
        val={"top1": 0.5},
        skipped_nonfinite=2,
        scaler_skipped=1,
    )
    saved = ckpt.make_state(
        state,
        drawn=state.drawn,
        model=model,
        ema=None,
        optimizer=optimizer,
        scaler=scaler,
        train_metrics={},
        run_facts={"classes": ["a", "b", "c"]},
        device=torch.device("cpu"),
    )
    ckpt.save_checkpoint(saved, tmp_path / "last.pt")
    loaded = ckpt.load_checkpoint(tmp_path / "last.pt")
    fresh = torch.nn.Linear(4, 3)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    back = ckpt.restore(
        loaded,
        model=fresh,
        ema=None,
        optimizer=fresh_optimizer,
        scaler=scaler,
        train_metrics={},
        holds_drawn=True,
    )
    assert (back.step, back.epoch, back.batches_in_epoch) == (7, 2, 4)
    assert (back.best, back.weights, back.val) == (state.best, "raw", {"top1": 0.5})
    assert torch.equal(back.drawn, torch.tensor([3, 0, 5]))
    assert (back.skipped_nonfinite, back.scaler_skipped) == (2, 1)
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(
        fresh_optimizer.state_dict()["state"][0]["momentum_buffer"],
        optimizer.state_dict()["state"][0]["momentum_buffer"],
    )
    other_rank = ckpt.restore(
        loaded,
        model=fresh,
        ema=None,
        optimizer=fresh_optimizer,
        scaler=scaler,
        train_metrics={},
        holds_drawn=False,
    )
    assert torch.equal(other_rank.drawn, torch.zeros(3, dtype=torch.long))  # rank 0 carries the sums

    for key in ("skipped_nonfinite", "scaler_skipped"):
        del loaded[key]
    without_counts = ckpt.restore(
        loaded,
        model=fresh,
        ema=None,
        optimizer=fresh_optimizer,
        scaler=scaler,
        train_metrics={},
        holds_drawn=True,
    )
    assert (without_counts.skipped_nonfinite, without_counts.scaler_skipped) == (0, 0)


def test_written_files_get_the_permissions_open_would_give(tmp_path):
    """Another user or service reads the weights: safetensors' save_file makes its file 0600, and a
    temporary file from mkstemp is 0600 too; every written file must end with 0666 less the umask."""

    expected = 0o666 & ~files._UMASK
    if expected == 0o600:
        pytest.skip("umask 077: 0600 is what open() gives too, so the check could not fail")
    ckpt.save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors", {})
    ckpt.save_checkpoint({"step": 1}, tmp_path / "last.pt")
    files.write_text(tmp_path / "a.json", "{}")
    for name in ("w.safetensors", "last.pt", "a.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
