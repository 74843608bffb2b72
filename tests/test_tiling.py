"""Tiling (models/tiling.py): tiled == untiled for any size and tile count (float64 models, maps stored exactly), up
to the storage rounding otherwise; inputs within one tile take the plain path; slicing == no slicing; the pipeline
call path. The device budget and the file store are checked in tests/test_tiling_budget.py."""

import copy

import pytest
import torch

from diffusers_klvae import KLVAE
from diffusers_klvae.models import tile_store, tiling
from diffusers_klvae.models.blocks import GroupNorm, SqueezeExcitation

CONFIG = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TILE = 16  # pixels (8 latents): the sizes below are 2×2 to 8×8 tiles, none a multiple of the tile
EXACT = 1e-10  # float64 model, float64 maps: tiled and untiled differ by summation order only (~1e-14 measured)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    rng = (ref.max() - ref.min()).item()
    return 10 * torch.log10(rng**2 / (x - ref).double().square().mean()).item()


def perturb(model: KLVAE, seed: int = 0) -> KLVAE:
    """Non-trivial norm gains, biases and squeeze-excitation gates: every layer matters."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.data = 1 + 0.25 * torch.randn(p.shape, generator=g)
        elif name.endswith("bias"):
            p.data = 0.05 * torch.randn(p.shape, generator=g)
        elif "squeeze_excitation.fc2" in name:
            p.data = torch.randn(p.shape, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = perturb(KLVAE(**CONFIG))
    yield model
    model.disable_tiling()


@pytest.fixture(scope="module")
def vae64(vae):
    """The same model in float64: the maps are stored in float64 too, so tiled == untiled is checked exactly."""
    return copy.deepcopy(vae).double()


@pytest.fixture(scope="module")
def se64():
    """A float64 model with squeeze-and-excitation gates (their spatial mean is a whole-map statistic too)."""
    torch.manual_seed(1)
    return perturb(KLVAE(**CONFIG, encoder_squeeze_excitation=True), seed=1).double()


def smooth_image(h: int, w: int, seed: int, batch: int = 1) -> torch.Tensor:
    """A photo-like image: smooth gradients plus a little texture, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=g) * 2 - 1
    return (torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
            + 0.1 * torch.randn(batch, 3, h, w, generator=g)).clamp(-1, 1)


def untiled_and_tiled(model, call, **tiling_options):
    with torch.no_grad():
        model.disable_tiling()
        want = call(model)
        model.enable_tiling(tile_sample_min_size=TILE, **tiling_options)
        got = call(model)
    model.disable_tiling()
    return want, got


# Budgets: None (default, from the tile: the maps of these sizes fit on the device), 4 kB (every map beyond the budget,
# in host memory, and bands of one row), 40 kB (some maps on the device, bands of a few rows).
BUDGETS = [None, 4_000, 40_000]


@pytest.mark.parametrize("budget", BUDGETS, ids=["default", "4kB", "40kB"])
@pytest.mark.parametrize("size", [(13, 11), (36, 22), (61, 57)], ids=["2x2", "5x3", "8x8"])
def test_tiled_decode_equals_untiled(vae64, size, budget):
    z = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(size[0]), dtype=torch.float64)
    want, got = untiled_and_tiled(vae64, lambda model: model.decode(z).sample, max_device_bytes=budget)
    assert got.shape == want.shape and got.dtype == torch.float64
    assert (got - want).abs().max() < EXACT


@pytest.mark.parametrize("budget", BUDGETS, ids=["default", "4kB", "40kB"])
@pytest.mark.parametrize("size", [(26, 22), (98, 62), (126, 118)], ids=["2x2", "7x4", "8x8"])
def test_tiled_encode_equals_untiled(vae64, size, budget):
    x = smooth_image(*size, seed=size[1], batch=2).double()
    want, got = untiled_and_tiled(vae64, lambda model: model.encode(x).latent_dist, max_device_bytes=budget)
    assert (got.mean - want.mean).abs().max() < EXACT
    assert (got.logvar - want.logvar).abs().max() < EXACT


@pytest.mark.parametrize("budget", [None, 4_000], ids=["default", "4kB"])
def test_squeeze_excitation_gates_use_whole_map_means(se64, budget):
    """The gates pool with the mean of the whole map, not of a band: tiled == untiled with gates that matter."""
    x = smooth_image(98, 62, seed=5).double()
    want, got = untiled_and_tiled(se64, lambda model: model.encode(x).latent_dist.mean, max_device_bytes=budget)
    assert (got - want).abs().max() < EXACT
    assert all(m.stats_hook is None for m in se64.modules() if isinstance(m, (GroupNorm, SqueezeExcitation)))


@pytest.mark.parametrize("budget", [None, 4_000], ids=["default", "4kB"])
def test_storage_rounding_is_the_only_difference(vae, budget):
    """A float32 model at 8×8 tiles: maps stored in float32 give the untiled result to float rounding; in scaled
    float16 (the default), to float16 rounding, well above bfloat16's in the same bytes."""
    z = torch.randn(1, 4, 61, 57, generator=torch.Generator().manual_seed(2))
    x = smooth_image(126, 118, seed=2)
    scores = {}
    for storage in (torch.float32, None, torch.bfloat16):
        want_dec, got_dec = untiled_and_tiled(vae, lambda model: model.decode(z).sample, max_device_bytes=budget,
                                              storage_dtype=storage)
        want_enc, got_enc = untiled_and_tiled(vae, lambda model: model.encode(x).latent_dist.mean,
                                              max_device_bytes=budget, storage_dtype=storage)
        if storage == torch.float32:
            assert (got_dec - want_dec).abs().max() < 1e-4 and (got_enc - want_enc).abs().max() < 1e-4
        else:
            assert 0 < (got_dec - want_dec).abs().max()  # 2-byte maps: not bit-identical
            scores[storage] = (psnr(got_dec, want_dec), psnr(got_enc, want_enc))
    (dec, enc), (bf16_dec, bf16_enc) = scores[None], scores[torch.bfloat16]
    assert bf16_dec >= 50 and bf16_enc >= 50, scores
    assert dec >= bf16_dec + 12 and enc >= bf16_enc + 12, scores


def test_scaled_float16_maps_keep_range_and_precision():
    """Stored float16 with a power-of-two scale per row and channel: values far beyond float16's range (the SD VAE's
    activations overflow it) and tiny ones come back within float16's relative precision of their row's largest
    magnitude, where plain float16 gives inf."""
    store = tile_store.MapStore(torch.device("cpu"), torch.float32, torch.float16, 10**6)
    g = torch.Generator().manual_seed(0)
    band = torch.randn(2, 3, 5, 7, generator=g) * torch.tensor([1e6, 1.0, 1e-6])[:, None, None]
    assert not torch.isfinite(band.half()).all()
    m = store.new((2, 3, 9, 7))
    m.begin()
    m.write(4, band.clone())
    got = m.read(4, 9)
    row_max = band.abs().amax(dim=3, keepdim=True)
    assert torch.isfinite(got).all()
    assert ((got - band).abs() <= row_max * 2**-11).all()


def test_custom_attention_processor_runs_on_the_whole_map(vae64):
    """The streamed attention is diffusers' AttnProcessor2_0 computed band by band; another processor (here diffusers'
    AttnProcessor, whose result is the same) is called on the whole map: either way tiled == untiled."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    z = torch.randn(1, 4, 36, 22, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    calls = []

    class Counting(AttnProcessor):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            calls.append(tuple(hidden_states.shape))
            return super().__call__(attn, hidden_states, *args, **kwargs)

    vae64.set_attn_processor(Counting())
    try:
        want, got = untiled_and_tiled(vae64, lambda model: model.decode(z).sample, max_device_bytes=4_000)
    finally:
        vae64.set_attn_processor(AttnProcessor2_0())
    assert calls == [(1, 16, 36, 22)] * 2  # untiled, then tiled: the whole map
    assert (got - want).abs().max() < EXACT


def test_tiling_beats_per_tile_statistics(vae):
    """2×2 tiles on a photo-like image: far closer to the untiled result than diffusers' tiling (per-tile GroupNorm,
    blended overlap) with the same weights."""
    from diffusers import AutoencoderKL

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
            model.tile_sample_min_size, model.tile_latent_min_size = 80, 40
            scores[name] = (psnr(model.decode(moments).sample, want), psnr(model.encode(x).latent_dist.mean, moments))
            model.disable_tiling()
    (dec, enc), (ref_dec, ref_enc) = scores["klvae"], scores["diffusers"]
    assert dec >= ref_dec + 8 and enc >= ref_enc + 8, scores


def test_one_tile_covering_the_input_takes_the_plain_path(vae, monkeypatch):
    z = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(7))
    x = smooth_image(24, 20, seed=7)
    vae.tile_sample_min_size, vae.tile_latent_min_size = 24, 12
    monkeypatch.setattr(tiling, "_conv_pass", None)  # the streamed path would call it
    with torch.no_grad():
        assert torch.equal(tiling.tiled_decode(vae, z), vae._decode(z))
        assert torch.equal(tiling.tiled_encode(vae, x), vae._encode(x))


def test_autograd_on_runs_the_untiled_network(vae):
    """Training through a tiled call: the untiled network runs (gradients need every activation anyway)."""
    z = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(6))
    want = vae.decode(z).sample
    vae.enable_tiling(tile_sample_min_size=TILE)
    got = vae.decode(z).sample
    vae.disable_tiling()
    assert torch.equal(got, want) and got.requires_grad


def test_hooks_are_removed_after_a_tiled_call(vae):
    z = torch.randn(1, 4, 20, 20)
    vae.enable_tiling(tile_sample_min_size=TILE)
    with torch.no_grad():
        vae.decode(z)
    vae.disable_tiling()
    assert all(m.stats_hook is None for m in vae.modules() if isinstance(m, GroupNorm))


def test_enable_tiling_rejects_bad_options(vae):
    for bad in (dict(max_device_bytes=0), dict(storage_dtype=torch.int8), dict(map_store="disk"),
                dict(map_dir="/nonexistent/folder")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            vae.enable_tiling(**bad)
    vae.disable_tiling()


def test_options_accumulate_until_disable_tiling_restores_the_defaults(vae):
    options = ("tile_max_device_bytes", "tile_storage_dtype", "tile_map_store", "tile_map_dir")
    defaults = {name: getattr(KLVAE(**CONFIG), name) for name in options}
    vae.enable_tiling(max_device_bytes=4_000, storage_dtype=torch.float32, map_store="file")
    vae.enable_tiling()  # left out: kept
    assert (vae.tile_max_device_bytes, vae.tile_storage_dtype, vae.tile_map_store) == (4_000, torch.float32, "file")
    vae.disable_tiling()
    assert {name: getattr(vae, name) for name in options} == defaults and not vae.use_tiling


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
    assert psnr(got, want) >= 45


def test_upsample_phase_form_equals_conv_after_upsampling():
    """The four-phase form of a 3×3 conv after nearest ×2 upsampling (how tiling runs upsamplers): conv(nearest_2x(x))
    to float64 rounding, and the conv's own forward is back afterwards."""
    from diffusers_klvae.models.blocks import nearest_2x
    from diffusers_klvae.models.upsample_phases import PhaseForm, has_phase_form, upsample_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).double()
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    assert has_phase_form(conv) and not has_phase_form(torch.nn.Conv2d(3, 5, 3))
    got = upsample_conv(conv, torch.nn.functional.pad(x, (1, 1, 1, 1)), PhaseForm())
    want = conv(nearest_2x(x))
    assert got.shape == want.shape and (got - want).abs().max() < 1e-12
    assert "_conv_forward" not in vars(conv)
