"""classifier/gradcam.py and the galleries evaluate.py draws with it: the map peaks on the only patch that
tells the classes apart (not on an equally contrasted one that does not), Grad-CAM equals the class
activation map where the two coincide, the layer picked for this project's architectures, no hooks or
gradients left behind, and errors.png / correct.png from a checkpoint, and none for an ONNX model."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_export import tiny_fmnist_run
from torch import nn

import evaluate
from classifier import gradcam, models, plots

SIDE, PATCH = 32, 6  # synthetic images: 32x32, class patterns and distractors 6x6
# Three classes told by a pattern, and a fourth with none. Without that fourth, a model may learn one of
# the three as "neither of the other two": no evidence in the image speaks for it, and Grad-CAM, which maps
# positive evidence, rightly finds none to show.
NUM_CLASSES, NO_PATTERN = 4, 3
NEAR_PX = 2  # a peak this close to the patch counts as on it: the map is upsampled from 16x16 cells


# --- synthetic data: the class is told by one small patch, placed anywhere ------------------------------


def class_pattern(label: int) -> torch.Tensor:
    """Zero-mean 6x6 patterns: horizontal stripes, vertical stripes, a checkerboard. Brightness says
    nothing; only the structure does."""
    rows, cols = torch.meshgrid(torch.arange(PATCH), torch.arange(PATCH), indexing="ij")
    parity = (rows, cols, rows + cols)[label] % 2
    return parity.float() * 2 - 1


def far_apart_corners(generator: torch.Generator, count: int) -> list[tuple[int, int]]:
    """`count` top-left corners of 6x6 patches whose boxes are at least one patch apart."""
    corners: list[tuple[int, int]] = []
    while len(corners) < count:
        r, c = torch.randint(0, SIDE - PATCH + 1, (2,), generator=generator).tolist()
        if all(max(abs(r - r0), abs(c - c0)) >= 2 * PATCH for r0, c0 in corners):
            corners.append((r, c))
    return corners


def paint(background: torch.Tensor, patch: torch.Tensor, corner: tuple[int, int]) -> torch.Tensor:
    image = background.clone()
    r, c = corner
    image[:, r : r + PATCH, c : c + PATCH] = patch * 1.5
    return image


def random_patch(generator: torch.Generator) -> torch.Tensor:
    """6x6 random +-1 values: as contrasted as a class pattern, and never the same twice."""
    return torch.randint(0, 2, (PATCH, PATCH), generator=generator).float() * 2 - 1


def synthetic_set(n: int, seed: int) -> dict[str, torch.Tensor]:
    """n images of noise (std 0.5), each holding its class's pattern at one random place (class
    NO_PATTERN: a random patch there) and a distractor at another: a random patch, the "shoe" a model
    could look at instead of the "number". Also each image with its pattern moved to a third place, the
    rest unchanged (`moved`)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    images, moved, corners, moved_corners = [], [], [], []
    for label in labels.tolist():
        background = torch.randn(1, SIDE, SIDE, generator=generator) * 0.5
        pattern_at, distractor_at, moved_to = far_apart_corners(generator, 3)
        with_distractor = paint(background, random_patch(generator), distractor_at)
        pattern = random_patch(generator) if label == NO_PATTERN else class_pattern(label)
        images.append(paint(with_distractor, pattern, pattern_at))
        moved.append(paint(with_distractor, pattern, moved_to))
        corners.append(pattern_at)
        moved_corners.append(moved_to)
    return {
        "images": torch.stack(images).expand(-1, 3, -1, -1).contiguous(),  # gray, as RGB models take it
        "moved": torch.stack(moved).expand(-1, 3, -1, -1).contiguous(),
        "labels": labels,
        "corners": torch.tensor(corners),
        "moved_corners": torch.tensor(moved_corners),
    }


def tiny_cnn() -> nn.Sequential:
    """Three 3x3 convs, one 2x2 pool: a 16x16 feature map (2 px a cell) before global average pooling."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, NUM_CLASSES),
    )


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The tiny CNN trained on 512 synthetic images until it tells 128 held-out ones apart (seconds)."""
    torch.manual_seed(0)
    model = tiny_cnn()
    train, held_out = synthetic_set(512, seed=1), synthetic_set(128, seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(3)
    for step in range(800):  # ~300 steps of 32 images (4 s on one CPU thread) reach 95%
        batch = torch.randint(0, 512, (32,), generator=generator)
        loss = nn.functional.cross_entropy(model(train["images"][batch]), train["labels"][batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 24 and accuracy(model, held_out) >= 0.95:
            break
    model.zero_grad(set_to_none=True)
    return model.eval(), held_out


def accuracy(model: nn.Module, data: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return (model(data["images"]).argmax(dim=1) == data["labels"]).float().mean().item()


def share_of_peaks_on(cams: torch.Tensor, corners: torch.Tensor) -> float:
    """The share of maps whose maximum lies on the 6x6 patch at `corners` (or within NEAR_PX of it)."""
    flat = cams.flatten(1).argmax(dim=1)
    rows, cols = flat // SIDE, flat % SIDE
    r0, c0 = corners[:, 0], corners[:, 1]
    inside_rows = (rows >= r0 - NEAR_PX) & (rows < r0 + PATCH + NEAR_PX)
    inside_cols = (cols >= c0 - NEAR_PX) & (cols < c0 + PATCH + NEAR_PX)
    return (inside_rows & inside_cols).float().mean().item()


# --- where the map peaks --------------------------------------------------------------------------------


def with_pattern(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The images whose class is told by a pattern: the ones with a place the map should peak at."""
    keep = data["labels"] != NO_PATTERN
    return {key: value[keep] for key, value in data.items()}


def test_map_peaks_on_the_informative_patch_and_follows_it(trained):
    model, held_out = trained
    assert accuracy(model, held_out) >= 0.95  # else the model has not learnt where the class is told
    held_out = with_pattern(held_out)
    n = len(held_out["labels"])
    cams, layer = gradcam.grad_cam(model, held_out["images"], held_out["labels"])
    assert layer == "6"  # the last ReLU: its 16x16 map is what the global pooling averages
    assert cams.shape == (n, SIDE, SIDE) and cams.dtype == torch.float32
    assert cams.min() >= 0 and torch.allclose(cams.flatten(1).amax(dim=1), torch.ones(n))
    for label in range(NO_PATTERN):  # every pattern class, not just on average
        of_class = held_out["labels"] == label
        on_pattern = share_of_peaks_on(cams[of_class], held_out["corners"][of_class])
        assert on_pattern >= 0.8, f"class {label}: the map peaks on its pattern in only {on_pattern:.0%}"

    # Control: the pattern moved elsewhere in the same image, all else equal: the peak goes with it.
    moved, _ = gradcam.grad_cam(model, held_out["moved"], held_out["labels"], layer=layer)
    assert share_of_peaks_on(moved, held_out["moved_corners"]) >= 0.8
    assert share_of_peaks_on(moved, held_out["corners"]) <= 0.1  # and leaves the old place


def test_an_untrained_model_does_not_pass_the_peak_test():
    """The peak test can fail: the same CNN before training, on the same images, looks at the pattern no
    more often than at the equally contrasted distractor."""
    torch.manual_seed(0)
    held_out = with_pattern(synthetic_set(128, seed=2))
    cams, _ = gradcam.grad_cam(tiny_cnn(), held_out["images"], held_out["labels"])
    assert share_of_peaks_on(cams, held_out["corners"]) < 0.8


def test_equals_the_class_activation_map_for_conv_then_global_average_pool():
    """For conv -> ReLU -> global average pool -> Linear, Grad-CAM's weights are the head's row for the
    class over h*w, so the map is relu(sum_k W[c, k] A_k), scaled to a maximum of 1 (Zhou et al., 2016)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    images, classes = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 1, 0, 1])
    cams, layer = gradcam.grad_cam(model, images, classes)
    assert layer == "1"
    with torch.no_grad():
        activations = model[1](model[0](images))  # (5, 4, 8, 8)
        expected = torch.einsum("nk,nkhw->nhw", model[4].weight[classes], activations).relu()
    expected = expected / expected.flatten(1).amax(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(cams, expected, atol=1e-5, rtol=1e-5)


# --- which layer, and nothing left behind ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, side, expected",
    [
        ("resnet18", 64, "layer4"),
        ("resnet18", 32, "layer3"),  # the ImageNet stem pools 32 px to 1x1 by layer4: nothing to localise
        ("small_resnet", 28, "features"),
        ("mobilenet_v3_small", 64, "features"),  # its squeeze-excite blocks pool too: not the cut
    ],
)
def test_picks_the_last_conv_stage(name, side, expected):
    torch.manual_seed(0)
    model = models.build_model(name, 10)  # no pretrained weights
    assert gradcam.feature_layer(model, torch.randn(1, 3, side, side)) == expected


def test_a_model_without_convolutions_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with pytest.raises(ValueError, match="runs no nn.Conv2d"):
        gradcam.grad_cam(model, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("training", [False, True])
def test_leaves_no_hooks_no_gradients_and_the_mode_it_found(training):
    torch.manual_seed(0)
    model = models.build_model("small_resnet", 4).train(training)
    before = {name: torch.full_like(p, 0.5) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():  # as an optimizer between steps might leave them
        p.grad = before[name].clone()
    with torch.no_grad():  # a caller scoring without a graph: grad_cam needs none from it
        cams, _ = gradcam.grad_cam(model, torch.randn(3, 3, 28, 28), torch.tensor([0, 1, 3]))
        assert not torch.is_grad_enabled()  # its grad mode given back
    assert cams.shape == (3, 28, 28)
    assert model.training == training
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, before[name]), name
    with pytest.raises(ValueError, match="one class per image"):
        gradcam.grad_cam(model, torch.randn(3, 3, 28, 28), torch.tensor([0, 1]))


# --- evaluate.py's galleries ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(fmnist_small_root, tmp_path_factory) -> Path:
    """The tiny Fashion-MNIST run test_evaluate.py evaluates (memoized on disk)."""
    return tiny_fmnist_run(fmnist_small_root, tmp_path_factory.getbasetemp())


@pytest.fixture
def galleries(monkeypatch) -> list[dict]:
    """What each gradcam_gallery_figure call was given, the real figure still drawn and saved."""
    calls: list[dict] = []
    draw = plots.gradcam_gallery_figure

    def recording(crops, cams, titles, heading, **kwargs):
        calls.append({"crops": crops, "cams": cams, "titles": titles, "heading": heading})
        return draw(crops, cams, titles, heading, **kwargs)

    monkeypatch.setattr(plots, "gradcam_gallery_figure", recording)
    return calls


def test_errors_and_correct_show_each_crop_beside_its_heatmap(tiny_run, galleries, tmp_path, capsys):
    run_dir = tiny_run
    evaluate.main(evaluate.EvalArgs(run_dir / "checkpoints" / "best.pt", out=tmp_path, errors=4, correct=3))
    printed = capsys.readouterr().out
    # resnet18's ImageNet stem at 32 px leaves layer4 1x1: the heatmaps are layer3's.
    assert "Grad-CAM: heatmaps of layer3 for the predicted class, in errors.png and correct.png" in printed
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    wrong = sum(row["correct"] == "0" for row in rows)
    errors, correct = galleries
    assert len(errors["crops"]) == min(4, wrong) and len(correct["crops"]) == min(3, len(rows) - wrong)
    assert errors["heading"].startswith(f"Most confident errors ({min(4, wrong)})")
    for call in galleries:
        assert len(call["cams"]) == len(call["crops"]) == len(call["titles"])
        for crop, cam in zip(call["crops"], call["cams"], strict=True):
            assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8
            assert cam.shape == (32, 32) and 0 <= cam.min() and cam.max() <= 1
    for name, call in (("errors.png", errors), ("correct.png", correct)):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"
            # Two tiles (crop, heatmap) of 1.3 in a pair at 110 dpi: at least 280 px per pair across.
            assert image.size[0] >= 280 * len(call["crops"]) and max(image.size) <= 2500, image.size
    assert any(title.startswith("true: ") for title in errors["titles"])

    no_correct = evaluate.EvalArgs(
        run_dir / "checkpoints" / "best.pt", out=tmp_path / "no-correct", errors=2, correct=0, label_issues=2
    )
    evaluate.main(no_correct)
    assert "in errors.png\n" in capsys.readouterr().out
    assert not (tmp_path / "no-correct" / "correct.png").exists()


def test_a_negative_correct_count_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--correct -1"):
        evaluate.main(evaluate.EvalArgs(tmp_path / "best.pt", correct=-1))


def test_onnx_report_says_it_has_no_heatmaps(tiny_run, galleries, tmp_path, capsys, monkeypatch):
    """What evaluate.py does with a model whose backend has no gradients. The tiny run's own model stands
    in for its ONNX export (exporting costs ~15 s; test_evaluate.py evaluates a real export): only the
    backend decides, and for anything but PyTorch no heatmap is drawn."""
    load = evaluate.load_classifier
    monkeypatch.setattr(
        evaluate, "load_classifier", lambda path, device: replace(load(path, device), backend="onnxruntime")
    )
    evaluate.main(evaluate.EvalArgs(tiny_run / "checkpoints" / "best.pt", out=tmp_path, errors=4))
    printed = capsys.readouterr().out
    assert "Grad-CAM: no heatmaps for onnxruntime (an ONNX graph has no gradients)" in printed
    assert not galleries  # nothing drawn as if it had one
    with Image.open(tmp_path / "errors.png") as image:
        assert image.format == "PNG"
    assert not (tmp_path / "correct.png").exists()
