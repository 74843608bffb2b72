"""Seam-free tiling (models/tiling.py): tiled == untiled once the whole-image GroupNorm statistics are exact, for
sizes that are not multiples of the tile; one tile == untiled; slicing == no slicing; the pipeline call path."""

import copy

import pytest
import torch

from diffusers_klvae import KLVAE
from diffusers_klvae.models import tiling
from diffusers_klvae.models.blocks import GroupNorm

CONFIG = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
# With this many statistics passes, the statistics of the tiled part are exact (pass k makes its k-th GroupNorm
# exact): at most 9 GroupNorms above latent resolution in the decoder (4 resnets + conv_norm_out), 4 in the encoder.
EXACT_PASSES = 9


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    rng = (ref.max() - ref.min()).item()
    return 10 * torch.log10(rng**2 / (x - ref).double().square().mean()).item()


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = KLVAE(**CONFIG).eval()
    for name, p in model.named_parameters():  # non-trivial norm gains and biases: every layer matters
        if "norm" in name and name.endswith("weight"):
            p.data = 1 + 0.25 * torch.randn_like(p)
        elif name.endswith("bias"):
            p.data = 0.05 * torch.randn_like(p)
    yield model
    model.disable_tiling()


def smooth_image(h: int, w: int, seed: int) -> torch.Tensor:
    """A photo-like image: smooth gradients plus a little texture, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
    return (torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
            + 0.1 * torch.randn(1, 3, h, w, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def vae64(vae):
    """The same model in float64: whole maps are then stored in float64 too, so tiled == untiled is checked exactly."""
    return copy.deepcopy(vae).double()


def untiled_exact_and_one_pass(vae64, call, *, tile: int):
    """``call(vae64)`` untiled, tiled with exact statistics (EXACT_PASSES), and tiled with one statistics pass."""
    with torch.no_grad():
        want = call(vae64)
        vae64.enable_tiling(tile_sample_min_size=tile, stat_passes=EXACT_PASSES)
        exact = call(vae64)
        vae64.enable_tiling(stat_passes=1)
        approximate = call(vae64)
    vae64.disable_tiling()
    return want, exact, approximate


# Latent sizes and tiles (pixels, f = 2): a tiled part after whole-map levels (odd sizes too), and everything tiled
# (no whole-map budget).
@pytest.mark.parametrize("size, tile, whole_map_tiles", [((36, 22), 24, 2), ((21, 13), 16, 2), ((36, 22), 48, 0)])
def test_tiled_decode_equals_untiled_with_exact_statistics(vae64, size, tile, whole_map_tiles, monkeypatch):
    monkeypatch.setattr(tiling, "WHOLE_MAP_TILES", whole_map_tiles)
    z = torch.randn(1, 4, *size, generator=torch.Generator().manual_seed(size[0]), dtype=torch.float64)
    want, got, approximate = untiled_exact_and_one_pass(vae64, lambda vae: vae.decode(z).sample, tile=tile)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-4
    assert (approximate - want).abs().max() > 1e-3  # a tiled part ran: one statistics pass is not exact


@pytest.mark.parametrize("size, tile, whole_map_tiles", [((72, 44), 24, 2), ((98, 62), 40, 0)])
def test_tiled_encode_equals_untiled_with_exact_statistics(vae64, size, tile, whole_map_tiles, monkeypatch):
    monkeypatch.setattr(tiling, "WHOLE_MAP_TILES", whole_map_tiles)
    x = smooth_image(*size, seed=size[1]).double()
    want, got, approximate = untiled_exact_and_one_pass(vae64, lambda vae: vae.encode(x).latent_dist, tile=tile)
    assert (got.mean - want.mean).abs().max() < 1e-4
    assert (got.logvar - want.logvar).abs().max() < 1e-4
    assert (approximate.mean - want.mean).abs().max() > 1e-4  # a tiled part ran


def test_squeeze_excitation_gates_use_whole_image_means(vae64, monkeypatch):
    """The gates' spatial mean is a whole-image statistic too: with exact statistics, tiles of an encoder with
    squeeze-and-excitation gate like the whole image (the gates are made non-trivial first)."""
    monkeypatch.setattr(tiling, "WHOLE_MAP_TILES", 0)
    se = KLVAE(**CONFIG, encoder_squeeze_excitation=True).double().eval()
    se.load_state_dict(vae64.state_dict(), strict=False)
    for name, p in se.named_parameters():
        if "squeeze_excitation.fc2" in name:
            p.data = torch.randn_like(p)
    x = smooth_image(98, 62, seed=5).double()
    want, got, _ = untiled_exact_and_one_pass(se, lambda vae: vae.encode(x).latent_dist.mean, tile=40)
    assert (got - want).abs().max() < 1e-4


def test_image_within_the_whole_map_budget_is_one_exact_pass(vae):
    """Up to ~2×2 tiles everything is held whole (bfloat16 maps, float32 compute): GroupNorm statistics are exact, no
    statistics pass runs, and only bfloat16 rounding separates the result from the untiled one."""
    z = torch.randn(1, 4, 40, 28, generator=torch.Generator().manual_seed(4))
    x = smooth_image(80, 56, seed=4)
    with torch.no_grad():
        want_dec, want_enc = vae.decode(z).sample, vae.encode(x).latent_dist.mean
        vae.enable_tiling(tile_sample_min_size=48)  # 80×56 is 1.9 tiles' area
        got = {passes: (vae.decode(z).sample, vae.encode(x).latent_dist.mean) for passes in (1, 3) if not vae.enable_tiling(stat_passes=passes)}
    vae.disable_tiling()
    assert torch.equal(got[1][0], got[3][0]) and torch.equal(got[1][1], got[3][1])  # no tiled part: passes unused
    assert psnr(got[1][0], want_dec) >= 50 and psnr(got[1][1], want_enc) >= 50


@pytest.mark.parametrize("whole_map_tiles", [2, 0])
def test_tiling_beats_per_tile_statistics(vae, whole_map_tiles, monkeypatch):
    """2×2 tiles on a photo-like image, with the whole-map budget (one exact pass) and without it (tiles, one
    statistics pass): far closer to the untiled result than diffusers' tiling (per-tile GroupNorm, blended overlap)
    with the same weights."""
    from diffusers import AutoencoderKL

    monkeypatch.setattr(tiling, "WHOLE_MAP_TILES", whole_map_tiles)

    ref = AutoencoderKL(**CONFIG).eval()
    ref.load_state_dict(vae.state_dict())
    x = smooth_image(128, 96, seed=3)
    scores = {}
    with torch.no_grad():
        vae.disable_tiling()
        moments = vae.encode(x).latent_dist.mean
        want = vae.decode(moments).sample
        for name, model in (("klvae", vae), ("diffusers", ref)):
            model.enable_tiling()
            model.tile_sample_min_size, model.tile_latent_min_size, model.tile_stat_passes = 80, 40, 1
            scores[name] = (psnr(model.decode(moments).sample, want), psnr(model.encode(x).latent_dist.mean, moments))
            model.disable_tiling()
    (dec, enc), (ref_dec, ref_enc) = scores["klvae"], scores["diffusers"]
    assert dec >= ref_dec + 8 and enc >= ref_enc + 8, scores


def test_one_tile_covering_the_input_is_exact(vae):
    z = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(7))
    x = smooth_image(24, 20, seed=7)
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_stat_passes = 64, 32, 1
    with torch.no_grad():
        assert (tiling.tiled_decode(vae, z) - vae._decode(z)).abs().max() < 1e-4
        assert (tiling.tiled_encode(vae, x) - vae._encode(x)).abs().max() < 1e-4


def test_hooks_are_removed_after_a_tiled_call(vae):
    z = torch.randn(1, 4, 20, 20)
    vae.enable_tiling(tile_sample_min_size=16)
    with torch.no_grad():
        vae.decode(z)
    vae.disable_tiling()
    assert all(m.stats_hook is None for m in vae.modules() if isinstance(m, GroupNorm))


def test_slicing_equals_no_slicing(vae):
    z = torch.randn(3, 4, 10, 8, generator=torch.Generator().manual_seed(8))
    x = smooth_image(20, 16, seed=8).repeat(3, 1, 1, 1) * torch.tensor([1.0, -0.5, 0.25])[:, None, None, None]
    with torch.no_grad():
        want_dec, want_enc = vae.decode(z).sample, vae.encode(x).latent_dist.mean
        vae.enable_slicing()
        got_dec, got_enc = vae.decode(z).sample, vae.encode(x).latent_dist.mean
        vae.disable_slicing()
    assert (got_dec - want_dec).abs().max() < 1e-5
    assert (got_enc - want_enc).abs().max() < 1e-5


def test_pipeline_call_path(vae):
    """What StableDiffusionPipeline does with tiling on: bare enable_tiling(), then decode(latents / scaling)."""
    small = KLVAE(**CONFIG, sample_size=16).eval()
    small.load_state_dict(vae.state_dict())
    latents = torch.randn(1, 4, 20, 12, generator=torch.Generator().manual_seed(9)) * small.config.scaling_factor
    with torch.no_grad():
        want = small.decode(latents / small.config.scaling_factor, return_dict=False)[0]
        small.enable_tiling()
        assert small.use_tiling and max(latents.shape[-2:]) > small.tile_latent_min_size  # the tiled path runs
        got = small.decode(latents / small.config.scaling_factor, return_dict=False)[0]
    assert got.shape == (1, 3, 40, 24)
    assert torch.isfinite(got).all()
    assert psnr(got, want) >= 45  # 20×12 latents with tiles of 8: within the whole-map budget
