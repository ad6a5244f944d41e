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
