"""torch.compile(fullgraph=True) of encode and decode: no graph break (diffusers' apply_forward_hook breaks it,
diffusers issue #10937). backend="eager" traces with Dynamo without generating code, so the test stays cheap."""

from __future__ import annotations

import pytest
import torch

from diffusers_klvae import KLVAE, preset_config


@pytest.fixture(scope="module")
def vae():
    return KLVAE(**preset_config("tiny")).eval()


def test_compiled_encode_fullgraph(vae):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(vae.encode, fullgraph=True, backend="eager")
    with torch.no_grad():
        got, expected = compiled(x).latent_dist, vae.encode(x).latent_dist
    assert torch.equal(got.mean, expected.mean) and torch.equal(got.logvar, expected.logvar)
    assert got.sample(generator=torch.Generator().manual_seed(0)).shape == expected.mean.shape


def test_compiled_decode_fullgraph(vae):
    torch._dynamo.reset()
    z = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(vae.decode, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(z).sample, vae.decode(z).sample)


def test_compiled_forward_fullgraph_with_grad(vae):
    """The training call (grad enabled: the non-inplace branch) compiles without a break as well."""
    torch._dynamo.reset()
    x = torch.randn(1, 3, 16, 16)
    compiled = torch.compile(vae, fullgraph=True, backend="eager")
    out = compiled(x, return_posterior=True)
    ref = vae(x, return_posterior=True)
    assert torch.equal(out.sample, ref.sample) and torch.equal(out.latent_dist.mean, ref.latent_dist.mean)
    out.sample.mean().backward()
    assert vae.decoder.conv_out.weight.grad is not None


def test_graph_break_would_be_detected():
    """Guard against a test that cannot fail: a function with a forced graph break must raise under fullgraph."""
    torch._dynamo.reset()

    def broken(x):
        torch._dynamo.graph_break()
        return x + 1

    with pytest.raises(Exception):
        torch.compile(broken, fullgraph=True, backend="eager")(torch.zeros(1))
