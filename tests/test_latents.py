"""Latent tools (issue 9): mask mapping, mask-aware decoding, attribute directions, interpolation, prior, previews."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusers_klvae import KLVAE
from diffusers_klvae.imaging import to_tensor
from diffusers_klvae.latent_masks import (
    apply_latent_mask,
    apply_pixel_mask,
    downsampling_factor,
    latent_mask_to_pixels,
    mask_to_latent,
    random_pixel_mask,
)
from diffusers_klvae.latent_preview import fit_latent_rgb_map, fit_preview_map, latents_to_rgb
from diffusers_klvae.latents import (
    attribute_direction,
    decode_latents,
    edit,
    encode_images,
    interpolate,
    interpolate_latents,
    sample_prior,
    scale_latents,
    slerp,
    unscale_latents,
)
from examples.masked_demo import train_mse

SIZE = 16  # synthetic images: 16x16 -> 8x8 latents with the f2 test model
SQUARE = (slice(4, 12), slice(4, 12))  # the "attribute": a bright square, on the 2-pixel latent grid
BRIGHT = 0.9




def tiny_vae(**overrides) -> KLVAE:
    torch.manual_seed(0)
    return KLVAE.from_preset("tiny", **overrides).eval()


def backgrounds(n: int, seed: int) -> torch.Tensor:
    """Smooth random colour fields (n, 3, 16, 16) in [-1, 1]."""
    low = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False) * 0.5).clamp(-1, 1)


def with_square(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[(..., *SQUARE)] = BRIGHT
    return x


def train_tiny(latent_mask_prob: float, steps: int = 60) -> KLVAE:
    vae = tiny_vae()
    pool = torch.cat([backgrounds(32, seed=1), with_square(backgrounds(32, seed=2))])
    train_mse(vae, pool, steps=steps, batch_size=8, lr=5e-3, latent_mask_prob=latent_mask_prob,
              generator=torch.Generator().manual_seed(0))
    return vae


@pytest.fixture(scope="module")
def mask_trained():
    """The tiny model after 60 plain-MSE steps with ``latent_mask_prob=0.5`` on squares / no squares."""
    return train_tiny(0.5)


# ------------------------------------------------------------------------------------------------ masks


def block_reduce(mask: np.ndarray, factor: int, reduce) -> np.ndarray:
    """Independent reference: apply ``reduce`` to every factor x factor block with Python loops."""
    b, _, h, w = mask.shape
    out = np.zeros((b, 1, h // factor, w // factor))
    for i in range(b):
        for y in range(h // factor):
            for x in range(w // factor):
                out[i, 0, y, x] = reduce(mask[i, 0, y * factor : (y + 1) * factor, x * factor : (x + 1) * factor])
    return out


@pytest.mark.parametrize("kind", ["boxes", "strokes"])
def test_mask_to_latent_exact_on_aligned_masks(kind):
    factor = 8
    pixel = random_pixel_mask(3, 64, 48, kind, torch.Generator().manual_seed(0), grid=factor)
    expected = pixel[:, :, ::factor, ::factor]  # aligned: one value per block, its top-left pixel
    for mode in ("any", "all", "area"):
        latent = mask_to_latent(pixel, factor, mode)
        assert latent.shape == (3, 1, 8, 6)
        assert torch.equal(latent, expected), mode
        assert torch.equal(latent_mask_to_pixels(latent, factor), pixel), mode


def test_mask_to_latent_unaligned_matches_block_rules():
    factor = 4
    rng = np.random.default_rng(0)
    pixel = (rng.random((2, 1, 16, 20)) > 0.3).astype(np.float32)  # holes cut across every block
    rules = {"any": np.min, "all": np.max, "area": np.mean}
    for mode, reduce in rules.items():
        latent = mask_to_latent(torch.from_numpy(pixel), factor, mode)
        np.testing.assert_allclose(latent.numpy(), block_reduce(pixel, factor, reduce), atol=1e-7, err_msg=mode)
    # one hole pixel in a block: "any" drops the cell, "all" keeps it, "area" keeps 15/16 of it
    single = torch.ones(1, 1, 8, 8)
    single[0, 0, 1, 2] = 0
    assert mask_to_latent(single, 4, "any")[0, 0].tolist() == [[0.0, 1.0], [1.0, 1.0]]
    assert mask_to_latent(single, 4, "all")[0, 0].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert mask_to_latent(single, 4, "area")[0, 0, 0, 0].item() == pytest.approx(15 / 16)


def test_mask_inputs_pil_numpy_invert_and_errors():
    vae = tiny_vae()
    hole = np.zeros((8, 8), dtype=np.uint8)
    hole[0:2, 2:6] = 255  # a diffusers inpainting mask: white = repaint
    from_pil = mask_to_latent(Image.fromarray(hole), vae, invert=True)
    from_bool = mask_to_latent(hole == 0, 2)
    expected = torch.ones(1, 1, 4, 4)
    expected[0, 0, 0, 1:3] = 0
    assert torch.equal(from_pil, expected) and torch.equal(from_bool, expected)
    with pytest.raises(ValueError, match="not a multiple of the downsampling factor 2"):
        mask_to_latent(torch.ones(1, 1, 9, 8), vae)
    with pytest.raises(ValueError, match="mode must be one of"):
        mask_to_latent(torch.ones(8, 8), 2, "some")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_to_latent(torch.full((8, 8), 2.0), 2)


def test_apply_latent_mask_is_the_models_latent_mask():
    vae = tiny_vae()
    x = backgrounds(2, seed=3)
    latent_mask = mask_to_latent(random_pixel_mask(2, SIZE, SIZE, "boxes", torch.Generator().manual_seed(1), grid=2), vae)
    z = vae.encode(x).latent_dist.mode()
    with torch.no_grad():
        via_forward = vae(x, latent_mask=latent_mask).sample
        via_tools = vae.decode(apply_latent_mask(z, latent_mask)).sample
    torch.testing.assert_close(via_forward, via_tools, rtol=0, atol=0)
    filled = apply_latent_mask(z, latent_mask, fill=0.5)
    torch.testing.assert_close(filled, z * latent_mask + 0.5 * (1 - latent_mask))
    target = apply_pixel_mask(x, latent_mask_to_pixels(latent_mask, vae))
    hole = latent_mask_to_pixels(latent_mask, vae).expand_as(x) == 0
    assert torch.all(target[hole] == 0) and torch.equal(target[~hole], x[~hole])
    with pytest.raises(ValueError, match="does not fit latents"):
        apply_latent_mask(z, torch.ones(2, 1, 4, 4))


@pytest.mark.parametrize("kind", ["boxes", "strokes"])
def test_random_pixel_mask(kind):
    masks = random_pixel_mask(6, 32, 48, kind, torch.Generator().manual_seed(5), grid=8)
    assert masks.shape == (6, 1, 32, 48) and set(masks.unique().tolist()) == {0.0, 1.0}
    kept = masks.mean(dim=(1, 2, 3))
    assert torch.all(kept > 0) and torch.all(kept < 1)  # every mask has a hole and kept pixels
    blocks = masks.unfold(2, 8, 8).unfold(3, 8, 8)  # (6, 1, 4, 6, 8, 8): constant on the latent grid
    assert torch.equal(blocks.amin(dim=(-1, -2)), blocks.amax(dim=(-1, -2)))
    again = random_pixel_mask(6, 32, 48, kind, torch.Generator().manual_seed(5), grid=8)
    assert torch.equal(masks, again)
    with pytest.raises(ValueError, match="multiples of grid=8"):
        random_pixel_mask(1, 30, 32, kind, grid=8)


def test_mask_aware_model_empties_the_hole(mask_trained):
    x = backgrounds(16, seed=11)
    pixel = random_pixel_mask(16, SIZE, SIZE, "boxes", torch.Generator().manual_seed(3), grid=2)
    latent_mask = mask_to_latent(pixel, mask_trained)
    hole = (1 - pixel).expand_as(x).bool()

    def hole_mse_to_gray(vae, masked: bool):
        z = encode_images(vae, x)
        decoded = decode_latents(vae, apply_latent_mask(z, latent_mask) if masked else z)
        return decoded[hole].square().mean().item()  # the target in the hole is the fill value 0

    masked, unmasked = hole_mse_to_gray(mask_trained, True), hole_mse_to_gray(mask_trained, False)
    assert masked < 0.75 * unmasked  # masked latents decode to an empty (gray) hole, whole latents do not
    plain = train_tiny(0.0)  # the same steps and data without the option
    assert masked < 0.75 * hole_mse_to_gray(plain, True)


# ------------------------------------------------------------------------------------------------ directions


def test_attribute_direction_adds_the_square(mask_trained):
    vae = mask_trained
    direction = attribute_direction(vae, with_square(backgrounds(16, seed=21)), backgrounds(16, seed=22))
    assert direction.shape == (4, SIZE // 2, SIZE // 2)
    energy = direction.norm(dim=0)  # (8, 8): where the direction lives
    inside = torch.zeros(SIZE // 2, SIZE // 2, dtype=torch.bool)
    inside[2:6, 2:6] = True
    assert energy[inside].mean() > 2 * energy[~inside].mean()

    test = backgrounds(8, seed=23)
    reconstructed = decode_latents(vae, encode_images(vae, test))
    edited = torch.stack([to_tensor(img) for img in edit(vae, test, direction, 1.0)])
    change = (edited - reconstructed).mean(dim=1)  # (8, 16, 16) brightness change
    square = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    square[SQUARE] = True
    assert change[:, square].mean() > 0.3  # the square appears (it is ~0.9 above a ~0 background)
    assert change[:, ~square].abs().mean() < 0.3 * change[:, square].mean()
    removed = torch.stack([to_tensor(img) for img in edit(vae, with_square(test), direction, -1.0)])
    assert (removed - decode_latents(vae, encode_images(vae, with_square(test)))).mean(dim=1)[:, square].mean() < -0.3

    unit = attribute_direction(vae, with_square(backgrounds(4, seed=21)), backgrounds(4, seed=22), normalize=True)
    assert unit.norm().item() == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------------------ interpolation


def test_slerp_and_lerp_endpoints_and_midpoints():
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for method in ("slerp", "lerp"):
        frames = interpolate_latents(a, b, 5, method)
        assert frames.shape == (5, 2, 4, 8, 8)
        assert torch.equal(frames[0], a) and torch.equal(frames[-1], b)
    e1, e2 = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])  # orthogonal, equal norms
    torch.testing.assert_close(slerp(e1, e2, 0.5), torch.tensor([1.0, 1.0]) * 3 / 2**0.5)
    torch.testing.assert_close(slerp(e1, e2, 1 / 3), 3 * torch.tensor([np.cos(np.pi / 6), np.sin(np.pi / 6)], dtype=torch.float32))
    torch.testing.assert_close(interpolate_latents(e1, e2, 3, "lerp")[1], torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(slerp(e1, 2 * e1, 0.5), 1.5 * e1)  # parallel: falls back to lerp


def test_interpolate_endpoints_are_the_inputs_latents():
    vae = tiny_vae(shift_factor=0.3, scaling_factor=0.5)
    a, b = backgrounds(2, seed=31)
    frames = interpolate(vae, a, b, steps=4, method="slerp")
    assert len(frames) == 4 and frames[0].size == (SIZE, SIZE)
    for frame, image in ((frames[0], a), (frames[-1], b)):
        expected = decode_latents(vae, encode_images(vae, image))[0]
        assert (to_tensor(frame) - expected).abs().max() <= 1.01 / 127.5  # one uint8 level of rounding


# ------------------------------------------------------------------------------------------------ prior


@pytest.mark.parametrize("stats", [dict(scaling_factor=0.5, shift_factor=0.25),
                                   dict(scaling_factor=2.0, latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0])])
def test_sample_prior_unscales_once(stats, monkeypatch):
    vae = tiny_vae(**stats)
    seen = []
    decode = vae.decode

    def spy(z, *args, **kwargs):
        seen.append(z.clone())
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", spy)
    images = sample_prior(vae, 3, 12, 20, generator=torch.Generator().manual_seed(0), temperature=0.5)
    assert len(images) == 3 and images[0].size == (20, 12)  # PIL size is (width, height)
    z = torch.randn(3, 4, 6, 10, generator=torch.Generator().manual_seed(0)) * 0.5  # diffusion space
    if "latents_mean" in stats:
        mean, std = torch.tensor(stats["latents_mean"]).view(1, 4, 1, 1), torch.tensor(stats["latents_std"]).view(1, 4, 1, 1)
        expected = z / stats["scaling_factor"] * std + mean
    else:
        expected = z / stats["scaling_factor"] + stats["shift_factor"]
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected)
    torch.testing.assert_close(scale_latents(vae, unscale_latents(vae, z)), z)
    with pytest.raises(ValueError, match="not a multiple"):
        sample_prior(vae, 1, 15, 16)


# ------------------------------------------------------------------------------------------------ previews


def test_preview_map_recovers_a_known_linear_map():
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 3, generator=gen) * 0.3, torch.tensor([0.1, -0.2, 0.05])
    latents = torch.randn(6, 4, 8, 8, generator=gen)
    colours = torch.einsum("bchw,cr->brhw", latents, weight) + bias.view(1, 3, 1, 1)  # (6, 3, 8, 8)
    images = colours.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # each latent pixel an 8x8 block
    factors = fit_latent_rgb_map(latents, images)
    assert factors.shape == (5, 3)
    torch.testing.assert_close(factors[:4], weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(factors[4], bias, atol=1e-5, rtol=0)
    torch.testing.assert_close(latents_to_rgb(latents, factors.tolist()), colours.clamp(-1, 1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"expected latents \(B, 4, h, w\)"):
        latents_to_rgb(torch.randn(1, 16, 8, 8), factors)


def test_preview_map_is_stored_in_the_config(tmp_path, photo_paths):
    from diffusers_klvae.imaging import load_image, resize_and_crop

    vae = tiny_vae()
    with pytest.raises(ValueError, match="no `latent_rgb_factors`"):
        latents_to_rgb(torch.randn(1, 4, 4, 4), vae)
    images = torch.stack([to_tensor(resize_and_crop(load_image(p), 32)) for p in photo_paths[:3]])
    factors = fit_preview_map(vae, images)
    vae.save_pretrained(tmp_path)
    reloaded = KLVAE.from_pretrained(tmp_path)
    assert reloaded.config.latent_rgb_factors == factors.tolist()
    latents = encode_images(reloaded, images)
    preview = latents_to_rgb(latents, reloaded)
    assert preview.shape == (3, 3, 16, 16)
    # the preview explains the pooled images better than their mean colour does
    target = F.avg_pool2d(images, downsampling_factor(vae))
    assert (preview - target).square().mean() < (target - target.mean(dim=(0, 2, 3), keepdim=True)).square().mean()


def test_preview_map_fits_images_of_several_sizes(photo_paths):
    from diffusers_klvae.imaging import load_image, resize_and_crop

    vae = tiny_vae()
    square, wide = (to_tensor(resize_and_crop(load_image(p), 32)) for p in photo_paths[:2])
    wide = torch.cat([wide, square.flip(-1)], dim=-1)  # (3, 32, 64)
    factors = fit_preview_map(vae, [square, wide], store=False)  # each encoded alone, every latent pixel in one fit
    assert vae.config.latent_rgb_factors is None  # store=False
    pooled = [F.avg_pool2d(x[None], downsampling_factor(vae)) for x in (square, wide)]
    latents = [encode_images(vae, x) for x in (square, wide)]
    strip = lambda ts: torch.cat([t.flatten(2)[..., None, :] for t in ts], dim=-1)  # noqa: E731 - (1, C, 1, every pixel)
    torch.testing.assert_close(factors, fit_latent_rgb_map(strip(latents), strip(pooled)), atol=1e-5, rtol=0)
