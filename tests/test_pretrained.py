"""The bundled pretrained model: a diffusers folder both classes load, small enough to ship, and still good.

A regression test of the shipped weights (the model card reports the full held-out figures at 256²): the
held-out photo ``chelsea.jpg`` (never trained on) at 128² must stay above a floor set 1 dB under what the
shipped weights measure.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open

from diffusers_klvae import KLVAE
from diffusers_klvae.evaluation import psnr
from diffusers_klvae.imaging import load_image, resize_and_crop, to_tensor, to_uint8

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "pretrained" / "klvae-small-photos"
HELD_OUT = ROOT / "assets" / "photos" / "chelsea.jpg"
PSNR_FLOOR_DB = 20.4  # chelsea.jpg, 128² center crop: the shipped weights measure 21.39 dB


def held_out_crop() -> torch.Tensor:
    return to_tensor(resize_and_crop(load_image(HELD_OUT), 128))[None]


def test_shipped_folder_is_fp16_safetensors_under_10_mb():
    weights = MODEL / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    with safe_open(weights, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert (MODEL / "README.md").read_text().count("PSNR") >= 1


def test_both_classes_load_it_and_agree():
    ours = KLVAE.from_pretrained(MODEL, torch_dtype=torch.float32).eval()
    theirs = AutoencoderKL.from_pretrained(MODEL, torch_dtype=torch.float32).eval()
    x = held_out_crop()
    with torch.no_grad():
        a = ours(x).sample
        b = theirs(x).sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_reconstructs_a_held_out_photo_above_the_floor():
    vae = KLVAE.from_pretrained(MODEL, torch_dtype=torch.float32).eval()
    x = held_out_crop()
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    assert psnr(to_uint8(x), to_uint8(rec)).item() >= PSNR_FLOOR_DB


def test_shipped_folder_is_ready_to_publish_and_its_metrics_are_klvae_eval_s():
    from diffusers_klvae.eval_results import load_metrics
    from diffusers_klvae.publish_checks import validate_folder

    validate_folder(MODEL)  # what klvae-push checks: config, weights, card metadata, no token or local path
    (result,) = load_metrics(MODEL / "metrics.json")  # the shape `klvae-push --metrics` reads
    assert f"**{result.metrics['psnr'].mean:.2f}**" in (MODEL / "README.md").read_text()
