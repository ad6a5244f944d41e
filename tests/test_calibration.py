"""classifier/calibration.py: the fitted temperature is the true one on synthetic data, it lowers NLL and
ECE, it survives degenerate inputs, the logits are gathered exactly once per image under DDP, and a
training run stores it in best.pt, last.pt and best.safetensors without touching the RNG streams."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from test_export import tiny_fmnist_run
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from classifier import checkpoint as ckpt
from classifier import distributed, models
from classifier.calibration import T_MAX, T_MIN, calibrate_best, collect_logits, fit_temperature
from classifier.data import ImageDataset, build_splits, make_loader
from classifier.images import load_image
from classifier.report import calibration_summary, expected_calibration_error, reliability_bins
from classifier.sampling import EpochSampler
from classifier.transforms import eval_transform


def synthetic(
    temperature: float, n: int = 20_000, k: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z and labels drawn from softmax(z / temperature): the true temperature is known."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n, k, generator=generator)
    labels = torch.multinomial((logits / temperature).softmax(dim=1), 1, generator=generator).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_temperature", [2.5, 0.5])
def test_recovers_a_known_temperature(true_temperature):
    logits, labels = synthetic(true_temperature)
    assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.03)


def test_fit_lowers_nll_and_ece_of_an_overconfident_model():
    logits, labels = synthetic(3.0)  # the logits are 3x too sharp for how often they are right
    temperature = fit_temperature(logits, labels)
    summary = calibration_summary(logits, labels, temperature)
    assert temperature > 2.5
    assert summary["nll_calibrated"] < summary["nll"] - 0.1
    assert summary["ece_calibrated"] < 0.5 * summary["ece"]
    # The minimum: a little off T in either direction is worse.
    for other in (0.9 * temperature, 1.1 * temperature):
        assert calibration_summary(logits, labels, other)["nll_calibrated"] > summary["nll_calibrated"]


def test_degenerate_inputs_give_a_clamped_or_neutral_temperature():
    separated = 10.0 * torch.eye(3).repeat(4, 1)  # every image right with a wide margin: NLL falls as T -> 0
    labels = torch.arange(3).repeat(4)
    assert fit_temperature(separated, labels) == pytest.approx(T_MIN, rel=1e-5)
    assert fit_temperature(-separated, labels) == pytest.approx(T_MAX, rel=1e-5)  # always wrong: flatten
    assert fit_temperature(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])) == 1.0  # T changes nothing
    # One image, right: its NLL log(1 + exp(-2 / T)) falls all the way down as T -> 0, so the clamp.
    assert fit_temperature(torch.tensor([[2.0, 0.0]]), torch.tensor([0])) == pytest.approx(T_MIN, rel=1e-6)
    # One image whose label is not the top logit: an interior minimum. With b = 1 / T and u = exp(b), the
    # NLL's derivative in b is E_softmax[z] - z_label, zero where 2u^2 + u - 3/u^3 = u^2 + u + 1/u^3: u^5 = 4.
    one = fit_temperature(torch.tensor([[2.0, 1.0, -3.0]]), torch.tensor([1]))
    assert one == pytest.approx(5 / math.log(4), rel=1e-6)
    logits, labels = synthetic(1.7, n=500)
    assert fit_temperature(logits, labels) == fit_temperature(logits.clone(), labels.clone())  # deterministic
    with pytest.raises(ValueError, match="no logits"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.tensor([[math.nan, 0.0]]), torch.tensor([0]))


def test_reliability_bins_add_up_to_the_ece():
    logits, labels = synthetic(2.0, n=3000)
    bins = reliability_bins(logits, labels)
    count = torch.tensor(bins["count"], dtype=torch.float64)
    assert count.sum() == 3000 and len(count) == 15
    gap = (torch.tensor(bins["accuracy"]) - torch.tensor(bins["confidence"])).abs().nan_to_num()
    assert (count * gap).sum().item() / 3000 == pytest.approx(
        expected_calibration_error(logits, labels), abs=1e-5
    )
    confidence = logits.softmax(dim=1).max(dim=1).values
    top = confidence >= 14 / 15
    assert bins["count"][-1] == int(top.sum())
    assert bins["confidence"][-1] == pytest.approx(confidence[top].double().mean().item(), abs=1e-6)


def test_collect_logits_adds_the_bias_and_keeps_the_order():
    images, labels = torch.randn(11, 4), torch.arange(11) % 3
    model = nn.Linear(4, 3)
    loader = DataLoader(TensorDataset(images, labels), batch_size=4, sampler=EpochSampler(11, shuffle=False))
    bias = torch.tensor([0.5, -1.0, 2.0])
    logits, targets = collect_logits(
        model,
        loader,
        device=torch.device("cpu"),
        autocast=torch.autocast("cpu", enabled=False),
        logit_bias=bias,
    )
    assert logits.dtype == torch.float32 and torch.equal(targets, labels)
    torch.testing.assert_close(logits, model(images).detach() + bias)


def gather_worker(rank: int, world: int, init: str, out: str) -> None:
    """One of two gloo processes: rank r holds items r, r + 2, ... of 5, as an evaluating EpochSampler
    deals them."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mine = torch.tensor(list(EpochSampler(5, shuffle=False, rank=rank, world_size=world)))
        logits = torch.stack([mine.float(), -mine.float()], dim=1)
        gathered = distributed.gather_strided((logits, mine), 5)
        padded = torch.cat([mine, mine[:1]]) if rank == 1 else mine  # torch's DistributedSampler pads rank 1
        try:
            distributed.gather_strided((padded.float()[:, None], padded), 5)
            refused = ""
        except ValueError as err:
            refused = str(err)
        torch.save({"gathered": gathered, "refused": refused}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_strided_restores_the_dataset_order_once_per_item(tmp_path):
    mp.spawn(gather_worker, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        logits, indices = result["gathered"]
        assert torch.equal(indices, torch.arange(5))
        assert torch.equal(logits[:, 0], torch.arange(5).float()) and torch.equal(
            logits[:, 1], -torch.arange(5).float()
        )
        assert "not an unpadded strided split of 5" in result["refused"]


# --- a training run stores the temperature -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(fmnist_small_root, tmp_path_factory) -> Path:
    return tiny_fmnist_run(fmnist_small_root, tmp_path_factory.getbasetemp())


def val_logits(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """best.pt's model over the run's validation split, rebuilt from scratch (as evaluate.py does)."""
    cfg = state["config"]
    splits = build_splits(
        Path(cfg["data"]["root"]), cfg["data"]["val_fraction"], cfg["seed"], classes=state["classes"]
    )
    loader = make_loader(
        ImageDataset(splits.val, eval_transform(state["preprocessing"])),
        EpochSampler(len(splits.val), shuffle=False),
        batch_size=8,
        num_workers=0,
        drop_last=False,
        pin_memory=False,
    )
    model, _ = models.model_from_checkpoint(state)
    return collect_logits(
        model, loader, device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False)
    ), loader


def independent_val_logits(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """best.pt's model run by hand over the run's val images, one batch, then float64: neither a loader nor
    collect_logits, so what calibration stored is checked against a second computation."""
    cfg = state["config"]
    splits = build_splits(
        Path(cfg["data"]["root"]), cfg["data"]["val_fraction"], cfg["seed"], classes=state["classes"]
    )
    transform = eval_transform(state["preprocessing"])
    images = torch.stack([transform(load_image(path)) for path, _ in splits.val])
    model, _ = models.model_from_checkpoint(state)
    with torch.no_grad():
        return model(images).double(), torch.tensor([label for _, label in splits.val])


def test_training_stores_the_temperature_fitted_on_val(tiny_run):
    best = ckpt.load_checkpoint(tiny_run / "checkpoints" / "best.pt")
    temperature, fit = best["temperature"], best["temperature_fit"]
    assert isinstance(temperature, float)
    assert set(fit) == {"val_nll_before", "val_nll_after", "val_ece_before", "val_ece_after"}
    logits, labels = independent_val_logits(best)
    assert len(labels) == 10

    def nll(t: float) -> float:
        return F.cross_entropy(logits / t, labels).item()

    # The stored numbers are best.pt's weights on the val split, at T = 1 and at the stored T. (Here the
    # two NLLs differ by 1e-3, and the raw weights' by more: a tolerance of 1e-5 tells them apart.)
    assert fit["val_nll_before"] == pytest.approx(nll(1.0), abs=1e-5)
    assert fit["val_nll_after"] == pytest.approx(nll(temperature), abs=1e-5)
    ece = expected_calibration_error
    assert fit["val_ece_before"] == pytest.approx(ece(logits, labels), abs=1e-5)
    assert fit["val_ece_after"] == pytest.approx(ece(logits / temperature, labels), abs=1e-5)
    # T minimizes that NLL: it is strictly convex in 1/T, so 5% either way is worse. This run's T is
    # neither a clamp nor the "no gain" 1.0, else the check below would prove nothing.
    assert T_MIN < temperature < T_MAX and temperature != 1.0
    assert nll(0.95 * temperature) > nll(temperature) < nll(1.05 * temperature)
    # One epoch: last.pt is the same save as best.pt, so it carries T too; so does best.safetensors.
    last = ckpt.load_checkpoint(tiny_run / "checkpoints" / "last.pt")
    assert last["temperature"] == temperature and last["temperature_fit"] == fit
    with safe_open(str(tiny_run / "best.safetensors"), "pt") as f:
        assert float(f.metadata()["temperature"]) == temperature
        assert f.metadata()["weights"] == "ema"  # the rest of the metadata survived the rewrite


def test_calibrate_best_leaves_the_rng_alone_and_skips_without_best(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    best = ckpt.load_checkpoint(run / "checkpoints" / "best.pt")
    _, loader = val_logits(best)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    lines = []
    log = SimpleNamespace(print=lines.append)
    args = dict(device=torch.device("cpu"), channels_last=False, log=log)
    assert calibrate_best(run, loader, **args) == pytest.approx(best["temperature"], rel=1e-4)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(lines) == 2 and lines[0].startswith("calibration: temperature") and "ECE" in lines[0]
    assert lines[1].startswith("abstain thresholds")
    (run / "checkpoints" / "best.pt").unlink()
    assert calibrate_best(run, loader, **args) is None


def test_fits_on_the_logits_with_the_checkpoints_logit_bias(tiny_run, tmp_path):
    """A run with --logit-adjustment stores a per-class bias: T is fitted on raw logits + bias, once."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    best = ckpt.load_checkpoint(run / "checkpoints" / "best.pt")
    (logits, labels), loader = val_logits({**best, "logit_bias": None})
    bias = torch.linspace(-2.0, 2.0, logits.shape[1])
    ckpt.save_checkpoint({**best, "logit_bias": bias.tolist()}, run / "checkpoints" / "best.pt")
    args = dict(device=torch.device("cpu"), channels_last=False, log=SimpleNamespace(print=print))
    fitted = calibrate_best(run, loader, **args)
    assert fitted == pytest.approx(fit_temperature(logits + bias, labels), rel=1e-3)
    # The NLL before scaling tells apart no bias, the bias once and twice (T alone may clamp for all three).
    nll = ckpt.load_checkpoint(run / "checkpoints" / "best.pt")["temperature_fit"]["val_nll_before"]
    assert nll == pytest.approx(F.cross_entropy(logits + bias, labels).item(), abs=1e-4)
    for wrong in (logits, logits + 2 * bias):
        assert abs(nll - F.cross_entropy(wrong, labels).item()) > 0.05
