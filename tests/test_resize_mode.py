"""--data.resize-mode: a tall crop keeps its whole content in 'pad' mode (PyTorch transforms, the fast path's
cache and batch augmentation, and the ONNX consumer reading the sidecar) and loses its top and bottom in
'crop' mode, so the marks below do tell the modes apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import train_tiny_run

import export
from classifier import fastdata, onnx_export, transforms
from classifier.batch_augment import BatchAugment
from classifier.config import IMAGENET_MEAN, IMAGENET_STD
from classifier.images import load_image

RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (128, 128, 128)


@pytest.fixture
def tall_image(tmp_path):
    """A 20x60 (width x height) crop like a torso: grey, its top 6 rows red and its bottom 6 rows blue."""
    pixels = np.full((60, 20, 3), GREY, dtype=np.uint8)
    pixels[:6], pixels[-6:] = RED, BLUE
    path = tmp_path / "tall.png"
    Image.fromarray(pixels).save(path)
    return path


def marks(image: torch.Tensor) -> tuple[bool, bool]:
    """(a red pixel in the top third, a blue pixel in the bottom third) of a uint8 (3, H, W) image."""
    r, g, b = image.int()
    red = (r > 200) & (g < 60) & (b < 60)
    blue = (b > 200) & (r < 60) & (g < 60)
    height = image.shape[1]
    return bool(red[: height // 3].any()), bool(blue[-(height // 3) :].any())


def spec(mode: str) -> dict:
    return transforms.preprocessing_spec(
        image_size=16,
        resize_size=18,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bilinear",
        resize_mode=mode,
    )


def test_pad_keeps_the_top_and_bottom_that_crop_cuts(tall_image):
    image = load_image(tall_image)
    padded = transforms.eval_resize_crop(spec("pad"))(image)
    assert padded.shape == (3, 16, 16) and marks(padded) == (True, True)
    assert marks(transforms.eval_resize_crop(spec("crop"))(image)) == (False, False)
    stretched = transforms.eval_resize_crop(spec("stretch"))(image)
    assert stretched.shape == (3, 16, 16) and marks(stretched) == (True, True)
    # the letterbox is the mean colour, which normalizes to (about) zero
    assert padded[:, 8, 0].tolist() == transforms.pad_fill(IMAGENET_MEAN)
    normalized = transforms.eval_transform(spec("pad"))(image)
    assert normalized[:, 8, 0].abs().max() < 0.01


def test_training_and_the_fast_path_keep_the_whole_tall_crop(tall_image):
    image = load_image(tall_image)
    whole_crop = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))  # the training crop is the whole square
    regular = transforms.train_transform(
        image_size=16,
        hflip=False,
        color_jitter=0.0,
        mean=(0.0, 0.0, 0.0),
        std=(1 / 255, 1 / 255, 1 / 255),  # so that the output is the uint8 pixels, as floats
        interpolation="bilinear",
        resize_mode="pad",
        square_side=18,
        **whole_crop,
    )(image)
    assert marks(regular.round().clamp(0, 255).to(torch.uint8)) == (True, True)

    # the fast path's val cache is eval_resize_crop's output bit for bit; its train squares letterbox too
    samples = [(str(tall_image), 0)]
    fill = transforms.pad_fill(IMAGENET_MEAN)
    val, _ = fastdata.decode_split(
        samples, 18, "bilinear", crop=16, mode="pad", fill=fill, num_workers=0, progress=False
    )
    assert torch.equal(val[0], transforms.eval_resize_crop(spec("pad"))(image))
    train_cache, _ = fastdata.decode_split(samples, 18, "bilinear", mode="pad", fill=fill, num_workers=0)
    assert train_cache.shape == (1, 3, 18, 18) and marks(train_cache[0]) == (True, True)
    augment = BatchAugment(
        16, hflip=False, color_jitter=0.0, mean=(0, 0, 0), std=(1 / 255,) * 3, **whole_crop
    )
    batch = augment(train_cache, torch.Generator().manual_seed(0))
    assert marks(batch[0].round().clamp(0, 255).to(torch.uint8)) == (True, True)
    cropped, _ = fastdata.decode_split(samples, 18, "bilinear", crop=16, num_workers=0)
    assert marks(cropped[0]) == (False, False)


def test_the_onnx_consumer_pads_as_training_did(fmnist_small_root, tmp_path, tall_image):
    """A run trained in pad mode, exported with uint8 input: the sidecar says 'pad' with its fill, and a
    consumer that follows it feeds the graph the whole tall crop and gets PyTorch's logits."""
    run_dir = train_tiny_run(
        fmnist_small_root,
        tmp_path,
        *("--data.image-size", "32", "--data.resize-size", "32", "--data.resize-mode", "pad"),
    )
    out = export.main(
        export.ExportArgs(run_dir, out=tmp_path / "deploy", batch_size=4, bake_preprocessing="uint8-nchw")
    )
    sidecar = json.loads((out / "labels_mapping.json").read_text())
    preprocessing = sidecar["preprocessing"]
    assert (preprocessing["resize_mode"], preprocessing["pad_to_square"]) == ("pad", 32)
    assert preprocessing["pad_fill"] == transforms.pad_fill(IMAGENET_MEAN)
    assert onnx_export.read_sidecar(out / "model.onnx")["preprocessing"] == preprocessing

    image = load_image(tall_image)
    pixels = transforms.eval_resize_crop(preprocessing)(image)  # what the consumer does itself
    assert pixels.shape == (3, 32, 32) and marks(pixels) == (True, True)
    session = onnx_export.onnx_session(out / "model.onnx")
    onnx_logits = session.run(None, {"images": pixels.unsqueeze(0).numpy()})[0]
    model, _ = export.load_source(run_dir / "checkpoints" / "best.pt")
    with torch.no_grad():
        torch_logits = model(transforms.eval_transform(preprocessing)(image).unsqueeze(0)).numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
