"""Latent statistics: values against a direct computation, stability, histogram, --write-config."""

import json

import pytest
import torch
from PIL import Image

from diffusers_klvae import KLVAE
from diffusers_klvae.imaging import load_image, resize_and_crop, to_tensor
from diffusers_klvae.latent_stats import compute_latent_statistics, main

RES = 32


@pytest.fixture(scope="module")
def images(photo_paths):
    return [load_image(p) for p in photo_paths[:5]]


def _direct_latents(vae, images):
    x = torch.stack([to_tensor(resize_and_crop(img, RES)) for img in images])
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean.double()  # (N, C, h, w)


def _moments(z):
    channel = z.transpose(0, 1).reshape(z.shape[1], -1)
    return z.mean().item(), z.std(unbiased=False).item(), channel.mean(1), channel.std(1, unbiased=False)


def test_statistics_match_a_direct_computation(tiny_vae, images):
    stats = compute_latent_statistics(tiny_vae, images, resolution=RES, batch_size=2, sample_posterior=False, progress=False)
    z = _direct_latents(tiny_vae, images)
    mean, std, channel_mean, channel_std = _moments(z)
    assert stats.all.count == 5 and stats.all.mean == pytest.approx(mean, abs=1e-6) and stats.all.std == pytest.approx(std, rel=1e-6)
    torch.testing.assert_close(torch.tensor(stats.all.channel_mean, dtype=torch.float64), channel_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(stats.all.channel_std, dtype=torch.float64), channel_std, atol=0, rtol=1e-6)
    assert stats.scaling_factor == pytest.approx(1 / std, rel=1e-6) and stats.shift_factor == pytest.approx(mean, abs=1e-6)

    half_mean, half_std, _, _ = _moments(z[:2])  # first half of 5 images = 2 = the first batch here
    assert stats.first_half.count == 2 and stats.first_half.std == pytest.approx(half_std, rel=1e-6)
    assert stats.first_batch.count == 2 and stats.first_batch.mean == pytest.approx(half_mean, abs=1e-6)
    assert stats.stability["std"] == pytest.approx(abs(half_std - std) / std, rel=1e-5)

    counts = torch.tensor(stats.histogram["counts"])
    assert counts.shape[0] == 4 and (counts.sum(1) == z[:, 0].numel()).all()  # every value lands in a bin


def test_posterior_samples_are_seeded_and_wider_than_the_mean(tiny_vae, images):
    kwargs = dict(resolution=RES, batch_size=5, progress=False)
    a = compute_latent_statistics(tiny_vae, images, seed=3, **kwargs)
    b = compute_latent_statistics(tiny_vae, images, seed=3, **kwargs)
    mode = compute_latent_statistics(tiny_vae, images, sample_posterior=False, **kwargs)
    assert a.all == b.all and a.settings["posterior"] == "sample (seed 3)"
    assert a.all.std > mode.all.std  # sampling adds the posterior variance


def test_cli_writes_stats_histogram_and_config(tmp_path, tiny_vae, photos_dir, capsys):
    model = tmp_path / "model"
    tiny_vae.save_pretrained(model)
    out = tmp_path / "stats"
    args = ["--model", str(model), "--data", str(photos_dir), "--resolution", str(RES), "--max-images", "4", "--mode"]
    assert main([*args, "--output", str(out), "--write-config"]) == 0
    assert "scaling_factor" in capsys.readouterr().out
    saved = json.loads((out / "latent_stats.json").read_text())
    assert saved["all"]["count"] == 4
    assert Image.open(out / "latent_histogram.png").size[0] > 100
    reloaded = KLVAE.from_pretrained(model)
    assert reloaded.config.scaling_factor == pytest.approx(saved["scaling_factor"], rel=1e-5)
    assert reloaded.config.shift_factor == pytest.approx(saved["shift_factor"], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(reloaded.decoder.conv_out.weight, tiny_vae.decoder.conv_out.weight)  # weights untouched

    assert main([*args, "--write-config", "--per-channel"]) == 0
    config = json.loads((model / "config.json").read_text())
    assert config["latents_std"] == pytest.approx(saved["all"]["channel_std"], rel=1e-5)
    assert config["scaling_factor"] == 1.0 and config["shift_factor"] is None and len(config["latents_mean"]) == 4


def test_cli_write_config_needs_a_folder(photos_dir, capsys):
    assert main(["--model", "tiny", "--data", str(photos_dir), "--write-config"]) == 2
    assert "needs a local diffusers-format model folder" in capsys.readouterr().err


def test_a_dead_latent_channel_is_named_not_divided_by(images):
    vae = KLVAE.from_preset("tiny").eval()
    with torch.no_grad():
        vae.quant_conv.weight[1] = 0  # channel 1 of the posterior mean is always 0
        vae.quant_conv.bias[1] = 0
    with pytest.raises(ValueError, match=r"latent channel\(s\) \[1\] have zero or non-finite variance over 5 images"):
        compute_latent_statistics(vae, images, resolution=RES, batch_size=2, sample_posterior=False, progress=False)


def test_cli_output_inside_the_data_is_refused_before_any_work(photos_dir, capsys):
    assert main(["--model", "tiny", "--data", str(photos_dir), "--output", str(photos_dir / "stats")]) == 2
    assert "is inside --data" in capsys.readouterr().err  # its latent_histogram.png would be read as a photo
    assert not (photos_dir / "stats").exists()
