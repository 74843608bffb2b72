"""Issue 16: one image reader. Hostile files through the reader, the training stream, evaluation, latent statistics
and the command line: each is counted with its reason (never fatal), and the readable ones have the right pixels.

Expected pixels are computed here with integer arithmetic, independently of ``imaging``'s float code.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_klvae import KLVAE
from diffusers_klvae.data import load_image_dataset, make_train_stream
from diffusers_klvae.imaging import UnreadableImage, list_image_paths, load_image, resize_and_crop, to_tensor

RES = 32
SIDE = 40  # readable images are 40x40 = 1600 pixels
PIXEL_LIMIT = 3000  # PIL.Image.MAX_IMAGE_PIXELS in these tests: 64x64 (PIL warns) and 100x100 (PIL raises) are bombs
HIDDEN = (255, 0, 255)  # the colour under alpha 0: must never show
READABLE = ["alpha.png", "deep16.png", "good0.png", "good1.png", "good2.png"]
SKIPPED = {  # file -> reason
    "bomb.png": "decompression bomb",
    "bomb_big.png": "decompression bomb",
    "dangling.jpg": "dangling symlink",
    "dir.jpg": "a folder named like an image",
    "fifo.png": "not a regular file",
    "truncated.jpg": "undecodable",
}
REASONS = {"decompression bomb": 2, "dangling symlink": 1, "a folder named like an image": 1, "not a regular file": 1, "undecodable": 1}


@pytest.fixture(autouse=True)
def small_pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIXEL_LIMIT)


def round_div(num: np.ndarray, den: int) -> np.ndarray:
    """round(num / den), halves up, in integers."""
    return (2 * num + den) // (2 * den)


def deep16_array() -> np.ndarray:
    """A 16-bit ramp over the full range: 0 and 65535 included."""
    return (np.arange(SIDE * SIDE, dtype=np.int64) * 65535 // (SIDE * SIDE - 1)).reshape(SIDE, SIDE).astype(np.uint16)


def deep16_expected() -> np.ndarray:
    grey = round_div(deep16_array().astype(np.int64) * 255, 65535).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def rgba_array() -> np.ndarray:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (SIDE, SIDE, 4)).astype(np.uint8)
    rgba[:, :10, 3] = 0  # fully transparent: hides a colour that must not show
    rgba[:, :10, :3] = HIDDEN
    rgba[:, 10:20, 3] = 255  # opaque
    return rgba


def rgba_expected() -> np.ndarray:
    rgba = rgba_array().astype(np.int64)
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return round_div(rgb * alpha + 255 * (255 - alpha), 255).astype(np.uint8)  # on white


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, photo_paths):
    """Five readable images (three plain, a 16-bit PNG, an RGBA PNG) and six that cannot be read, plus a text file."""
    root = tmp_path_factory.mktemp("hostile")
    for i, path in enumerate(photo_paths[:3]):
        resize_and_crop(Image.open(path).convert("RGB"), SIDE).save(root / f"good{i}.png")
    Image.fromarray(deep16_array()).save(root / "deep16.png")
    Image.fromarray(rgba_array(), "RGBA").save(root / "alpha.png")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(root / "bomb.png")
    Image.new("RGB", (100, 100), (10, 20, 30)).save(root / "bomb_big.png")
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    os.mkfifo(root / "fifo.png")  # opening it would block forever: the reader must refuse it unopened
    (root / "dir.jpg").mkdir()
    resize_and_crop(Image.open(photo_paths[0]).convert("RGB"), 48).save(root / "whole.jpeg", quality=95)
    data = (root / "whole.jpeg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: 2 * len(data) // 3])  # headers intact, scan data cut
    (root / "whole.jpeg").unlink()
    (root / "notes.txt").write_text("not an image name: not listed, not counted")
    return root


@pytest.fixture(scope="module")
def expected(hostile):
    """Name -> the (3, RES, RES) tensor each readable image must become (expected 8-bit pixels, then the protocol)."""
    arrays = {"deep16.png": deep16_expected(), "alpha.png": rgba_expected()}
    for i in range(3):
        arrays[f"good{i}.png"] = np.asarray(Image.open(hostile / f"good{i}.png").convert("RGB"))
    return {name: to_tensor(resize_and_crop(Image.fromarray(a), RES)) for name, a in arrays.items()}


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return KLVAE.from_preset("tiny").eval()


# ------------------------------------------------------------------------------------------------ the reader


def test_listing_holds_every_image_named_path(hostile):
    names = [os.path.relpath(p, hostile) for p in list_image_paths(hostile)]
    assert names == sorted(READABLE + list(SKIPPED))


def test_reader_pixels_and_reasons(hostile):
    assert Image.open(hostile / "deep16.png").mode == "I;16"  # what the test claims to test
    np.testing.assert_array_equal(np.asarray(load_image(hostile / "deep16.png")), deep16_expected())
    alpha = np.asarray(load_image(hostile / "alpha.png"))
    np.testing.assert_array_equal(alpha, rgba_expected())
    assert (alpha[:, :10] == 255).all()  # the hidden magenta is gone: white
    for name, reason in SKIPPED.items():
        with pytest.raises(UnreadableImage) as info:
            load_image(hostile / name)
        assert info.value.reason == reason and name in str(info.value)


@pytest.mark.parametrize("mode", ["I;16B", "I", "F"])
def test_other_deep_modes_scale_to_8_bits(tmp_path, mode):
    ramp = deep16_array().astype(np.int64)
    if mode == "F":
        values = np.array([[0.0, 0.25, 0.5, 1.0, 1.5, -0.2]], dtype=np.float32)
        image, expected = Image.fromarray(values, "F"), np.array([[0, 64, 128, 255, 255, 0]])  # round(255 v), clipped
    elif mode == "I;16B":
        image, expected = Image.fromarray(ramp.astype(">u2")), round_div(ramp * 255, 65535)
    else:
        image, expected = Image.fromarray(ramp.astype(np.int32)), round_div(ramp * 255, 65535)
    image.save(tmp_path / "deep.tif")
    assert Image.open(tmp_path / "deep.tif").mode == mode
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "deep.tif"))[..., 0], expected)


def test_nan_float_image_is_refused(tmp_path):
    Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32), "F").save(tmp_path / "nan.tif")
    with pytest.raises(UnreadableImage, match="non-finite pixels"):
        load_image(tmp_path / "nan.tif")


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90° clockwise
    Image.new("RGB", (40, 20), (200, 0, 0)).save(tmp_path / "rotated.png", exif=exif)
    assert load_image(tmp_path / "rotated.png").size == (20, 40)


# ------------------------------------------------------------------------------------------------ every consumer


def test_training_stream_counts_every_hostile_file(hostile, expected):
    dataset = load_image_dataset(train_data_dir=hostile)
    stream = make_train_stream(dataset, resolution=RES, batch_size=1, center_crop=True, random_flip=False, shuffle_buffer_size=1, min_size=0)
    images = []
    for example in stream.examples():
        if stream.epoch:
            break
        images.append(example["pixel_values"])
    assert stream.skipped == len(SKIPPED) and stream.skip_reasons == REASONS
    assert len(images) == len(READABLE)
    for image, name in zip(images, READABLE):  # stored order = sorted names
        assert torch.equal(image, expected[name]), name
    assert json.loads(json.dumps(stream.state_dict()))["skip_reasons"] == REASONS  # saved with checkpoints


def test_training_data_files_glob_goes_through_the_same_reader(hostile):
    dataset = load_image_dataset(data_files=[str(hostile / "*.png")])
    stream = make_train_stream(dataset, resolution=RES, batch_size=5, center_crop=True, random_flip=False, shuffle_buffer_size=1, min_size=0)
    next(iter(stream))
    assert stream.skip_reasons == {"decompression bomb": 2, "not a regular file": 1}


def test_evaluation_counts_every_hostile_file(hostile, expected, tiny_vae):
    from diffusers_klvae.evaluation import evaluate

    result = evaluate(tiny_vae, hostile, resolution=RES, metrics=("psnr",), keep_images=len(READABLE), progress=False)
    assert result.count == len(READABLE) and result.image_names == READABLE
    assert result.skipped == len(SKIPPED) and sorted(result.skipped_names) == sorted(SKIPPED)
    assert result.skip_reasons == REASONS
    assert torch.equal(result.samples[0], torch.stack([expected[n] for n in READABLE]))
    assert result.data_source.to_dict() == {"kind": "folder", "path": str(hostile)}
    assert "Skipped by" in result.to_markdown() and "2 decompression bomb" in result.to_markdown()


def test_latent_statistics_count_every_hostile_file(hostile, tiny_vae):
    from diffusers_klvae.latent_stats import compute_latent_statistics

    stats = compute_latent_statistics(tiny_vae, hostile, resolution=RES, progress=False)
    assert stats.all.count == len(READABLE) and stats.skipped == len(SKIPPED) and stats.skip_reasons == REASONS
    assert f"Skipped {len(SKIPPED)} images" in stats.to_markdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_vae):
    path = tmp_path_factory.mktemp("model")
    tiny_vae.save_pretrained(path)
    return path


def test_klvae_reconstruct_skips_hostile_files(hostile, model_dir, tmp_path, caplog):
    from diffusers_klvae.cli import main

    with caplog.at_level(logging.WARNING):
        assert main(["reconstruct", "--model", str(model_dir), str(hostile), "--out", str(tmp_path), "--resolution", str(RES)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == READABLE
    log = caplog.text
    assert all(name in log and reason in log for name, reason in SKIPPED.items())


def test_klvae_eval_and_stats_commands_skip_hostile_files(hostile, model_dir, tmp_path, capsys):
    from diffusers_klvae import evaluation, latent_stats

    assert evaluation.main(["--model", str(model_dir), "--data", str(hostile), "--metrics", "psnr", "--resolution", str(RES),
                            "--output", str(tmp_path / "eval")]) == 0
    assert "Skipped by" in capsys.readouterr().out
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())["results"][0]
    assert saved["skipped"] == len(SKIPPED) and saved["skip_reasons"] == REASONS
    assert latent_stats.main(["--model", str(model_dir), "--data", str(hostile), "--resolution", str(RES)]) == 0
    assert f"Skipped {len(SKIPPED)} images" in capsys.readouterr().out
