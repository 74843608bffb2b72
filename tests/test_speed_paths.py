"""The inference fast paths of models/blocks.py (in-place activations, row-band convolutions, layer-by-layer stages)
give the outputs of the autograd path and of diffusers' AutoencoderKL."""

import pytest
import torch
from conftest import perturb_norms_and_biases
from diffusers import AutoencoderKL

from diffusers_klvae import KLVAE
from diffusers_klvae.models import blocks

CONFIG = dict(block_out_channels=(8, 16, 16), norm_num_groups=4, layers_per_block=1,
              down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


@pytest.fixture(scope="module")
def pair():
    """KLVAE and AutoencoderKL holding the same weights, with non-trivial norm gains and biases."""
    torch.manual_seed(0)
    ref = perturb_norms_and_biases(AutoencoderKL(**CONFIG).eval(), gain_std=0.3, bias_std=0.1)
    vae = KLVAE(**CONFIG).eval()
    vae.load_state_dict(ref.state_dict())
    return vae, ref


@pytest.fixture
def small_bands(monkeypatch):
    """Make every map of the tiny model 'large', so that inference takes the row-band path with many bands."""
    monkeypatch.setattr(blocks, "BAND_ELEMENTS", 2**11)


def test_band_path_matches_grad_path_and_diffusers(pair, small_bands):
    vae, ref = pair
    x = torch.rand(2, 3, 40, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 10, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast_dec, fast_enc = vae.decode(z).sample, vae.encode(x).latent_dist.mean
        ref_dec, ref_enc = ref.decode(z).sample, ref.encode(x).latent_dist.mean
    with torch.enable_grad():
        slow_dec, slow_enc = vae.decode(z).sample.detach(), vae.encode(x).latent_dist.mean.detach()
    with torch.no_grad():
        assert blocks._banded(torch.empty(1, 8, 40, 24)), "the fixture should force the band path"
    for fast, slow, want in ((fast_dec, slow_dec, ref_dec), (fast_enc, slow_enc, ref_enc)):
        assert (fast - slow).abs().max() < 1e-5
        assert (fast - want).abs().max() < 1e-4


def test_band_edges_cover_every_row(small_bands):
    """Upsample + conv and norm-act-conv in bands equal the whole-map ops for odd heights and one-row bands."""
    torch.manual_seed(0)
    up = blocks.Upsample(channels=4).eval()
    norm, conv, square = blocks.normalize(4, 2), blocks.conv3(4, 6), blocks.conv3(4, 4)
    for h in (1, 3, 7):
        x = torch.randn(1, 4, h, 5)
        with torch.no_grad():
            want_up = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
            want = conv(torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2, norm.weight, norm.bias, norm.eps)))
            got_up = blocks.conv_rows(up.conv, x, lambda band: band, upsample=True)
            scale, shift = norm.scale_shift(x)
            got = blocks.conv_rows(conv, x, lambda band: torch.nn.functional.silu(torch.addcmul(shift, band, scale)))
            pre = lambda band: torch.nn.functional.silu(torch.addcmul(shift, band, scale))  # noqa: E731
            want_square = square(torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2, norm.weight, norm.bias, norm.eps)))
            got_square = blocks.conv_rows(square, x.clone(), pre, inplace=True)  # written over its input
        assert (got_up - want_up).abs().max() < 1e-5
        assert (got - want).abs().max() < 1e-5
        assert (got_square - want_square).abs().max() < 1e-5


def test_downsample_bands_equal_the_whole_map_op(small_bands):
    """Stride-2 downsampling in bands equals the whole-map op for odd and even sizes."""
    torch.manual_seed(0)
    down = blocks.Downsample(channels=4).eval()
    for h, w in ((3, 3), (6, 5), (9, 8)):
        x = torch.randn(1, 4, h, w)
        with torch.no_grad():
            want = down.conv(torch.nn.functional.pad(x, (0, 1, 0, 1)))
            assert (down(x) - want).abs().max() < 1e-5


def test_channels_last_and_gradients(pair):
    vae, ref = pair
    x = torch.rand(1, 3, 32, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        want = ref(x).sample
        got = vae.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last)).sample
    vae.to(memory_format=torch.contiguous_format)
    assert (got - want).abs().max() < 1e-4
    # training still works: same loss gradients as diffusers
    for model in (vae, ref):
        model.zero_grad()
        model(x).sample.square().mean().backward()
    g, r = vae.decoder.conv_out.weight.grad, ref.decoder.conv_out.weight.grad
    assert (g - r).abs().max() < 1e-4 * max(1.0, r.abs().max().item())
    e, s = vae.encoder.conv_in.weight.grad, ref.encoder.conv_in.weight.grad
    assert (e - s).abs().max() < 1e-4 * max(1.0, s.abs().max().item())


def test_bf16_decode_is_close_to_fp32(pair, small_bands):
    vae, _ = pair
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = vae.decode(z).sample
        got = vae.to(torch.bfloat16).decode(z.bfloat16()).sample.float()
    vae.float()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_compile_fullgraph_with_band_path(pair, small_bands):
    vae, _ = pair
    z = torch.randn(1, 4, 6, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = vae.decode(z).sample
        got = torch.compile(vae.decode, fullgraph=True, backend="eager")(z).sample
    assert (got - want).abs().max() < 1e-5
