"""KLVAE against diffusers' AutoencoderKL holding identical weights: outputs, keys, folders, posterior, runtime switches.

diffusers is the independent reference here: every expected number below is computed by ``diffusers.AutoencoderKL`` (or
its ``DiagonalGaussianDistribution``) in the same test, never hard-coded.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as RefPosterior

from diffusers_klvae import KLVAE
from diffusers_klvae.models.posterior import DiagonalGaussianDistribution

TOL = 1e-4


def small_config(levels: int = 2, latent_channels: int = 4, **overrides) -> dict:
    """A tiny KL autoencoder config: channels 8, 16, 16, ... with 4 GroupNorm groups, factor 2**(levels - 1)."""
    channels = tuple([8, 16, 16, 16][:levels])
    base = dict(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=channels, layers_per_block=1, norm_num_groups=4, latent_channels=latent_channels)
    return {**base, **overrides}


def random_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights with every parameter perturbed (norm affines away from 1/0, non-zero biases), so a swapped or skipped
    layer shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=g)
        if "norm" in key and key.endswith("weight"):
            state[key] = 1.0 + 0.1 * noise
        elif key.endswith("bias"):
            state[key] = 0.05 * noise
        else:
            fan_in = value[0].numel() if value.ndim > 1 else 1
            state[key] = noise / fan_in**0.5
    return state


def twin_models(config: dict, seed: int = 0) -> tuple[KLVAE, AutoencoderKL]:
    """A KLVAE and an AutoencoderKL of the same config holding the same (random) weights, in eval mode."""
    ours, ref = KLVAE(**config).eval(), AutoencoderKL(**config).eval()
    state = random_state(ref, seed)
    ref.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)
    return ours, ref


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_parity(ours: KLVAE, ref: AutoencoderKL, x: torch.Tensor) -> None:
    with torch.no_grad():
        post, ref_post = ours.encode(x).latent_dist, ref.encode(x).latent_dist
        assert max_diff(post.mean, ref_post.mean) <= TOL
        assert max_diff(post.logvar, ref_post.logvar) <= TOL
        z = ref_post.sample(generator=torch.Generator().manual_seed(1))
        assert max_diff(ours.decode(z).sample, ref.decode(z).sample) <= TOL
        out = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(2)).sample
        ref_out = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(2)).sample
        assert max_diff(out, ref_out) <= TOL


# ------------------------------------------------------------------ the parity matrix
PARITY_CASES = {
    "tiny": (small_config(), (1, 3, 16, 16)),
    "latent16": (small_config(latent_channels=16), (1, 3, 16, 16)),
    "f4": (small_config(levels=3), (1, 3, 16, 16)),
    "no-quant-convs": (small_config(levels=3, use_quant_conv=False, use_post_quant_conv=False), (1, 3, 16, 16)),
    "no-mid-attention": (small_config(levels=3, mid_block_add_attention=False), (1, 3, 16, 16)),
    "non-square-batch3": (small_config(levels=3), (3, 3, 8, 24)),
    "two-layers-swish": (small_config(layers_per_block=2, act_fn="swish"), (2, 3, 12, 20)),
    "in1-out2": (small_config(in_channels=1, out_channels=2), (2, 1, 10, 6)),
}


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_parity_small_configs(name):
    config, shape = PARITY_CASES[name]
    ours, ref = twin_models(config)
    assert_parity(ours, ref, torch.randn(shape))


def test_parity_sd_default_config():
    """The SD KL-f8 architecture itself ([128, 256, 512, 512], 2 layers, 4 channels) on a small non-square batch."""
    from accelerate import init_empty_weights

    config = KLVAE.preset_config("sd-kl-f8")
    ours = KLVAE(**config).eval()
    with init_empty_weights():  # skip diffusers' init of 84M parameters: the weights are ours, shared
        ref = AutoencoderKL(**config)
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    ref.eval()
    assert ours.downsampling_factor == 8
    assert_parity(ours, ref, torch.randn(2, 3, 16, 24))


@pytest.mark.parametrize("act_fn", ["gelu", "mish", "relu"])
def test_parity_other_activations(act_fn):
    ours, ref = twin_models(small_config(layers_per_block=2, act_fn=act_fn))
    assert_parity(ours, ref, torch.randn(1, 3, 12, 20))


# ------------------------------------------------------------------ keys, folders, round trips
@pytest.mark.parametrize("config", [KLVAE.preset_config("sd-kl-f8"), small_config(levels=3, use_quant_conv=False,
                                    use_post_quant_conv=False, mid_block_add_attention=False)])
def test_state_dict_keys_and_shapes_identical(config):
    from accelerate import init_empty_weights

    with init_empty_weights():
        ours, ref = KLVAE(**config), AutoencoderKL(**config)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes  # same keys, same shapes
    assert (ours.quant_conv is None) == (not config.get("use_quant_conv", True))
    assert (ours.post_quant_conv is None) == (not config.get("use_post_quant_conv", True))


def test_state_dict_key_order_identical():
    from accelerate import init_empty_weights

    config = small_config(levels=3)
    with init_empty_weights():
        ours, ref = KLVAE(**config), AutoencoderKL(**config)
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.fixture
def loading_warnings(caplog):
    caplog.set_level(logging.WARNING)
    return caplog


def assert_clean_load(info: dict, caplog) -> None:
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert info["error_msgs"] == []
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("diffusers")]
    assert noisy == [], noisy


def test_klvae_folder_loads_in_autoencoderkl(tmp_path, loading_warnings):
    ours, ref = twin_models(small_config(levels=3))
    ours.save_pretrained(tmp_path)
    loaded, info = AutoencoderKL.from_pretrained(tmp_path, output_loading_info=True)
    assert_clean_load(info, loading_warnings)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(loaded(x).sample, ref(x).sample) == 0.0


def test_autoencoderkl_folder_loads_in_klvae(tmp_path, loading_warnings):
    ours, ref = twin_models(small_config(levels=3, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False))
    ref.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)
    ref.save_pretrained(tmp_path)
    loaded, info = KLVAE.from_pretrained(tmp_path, output_loading_info=True)
    assert_clean_load(info, loading_warnings)
    assert isinstance(loaded, KLVAE)
    assert loaded.config.shift_factor == 0.1159 and loaded.config.scaling_factor == 0.3611
    assert loaded.quant_conv is None and loaded.post_quant_conv is None
    x = torch.randn(2, 3, 16, 8)
    with torch.no_grad():
        assert max_diff(loaded(x).sample, ref(x).sample) <= TOL


def test_default_klvae_folder_is_a_plain_autoencoderkl_folder(tmp_path):
    config = small_config(levels=3)
    ours, ref = twin_models(config)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert (tmp_path / "ours" / "diffusion_pytorch_model.safetensors").is_file()
    ours_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    ref_config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert ours_config["_class_name"] == "AutoencoderKL"
    assert ours_config == ref_config
    # and the in-memory model keeps its own class and extra config keys
    assert ours.config.encoder_squeeze_excitation is False and type(ours) is KLVAE


def test_klvae_save_load_round_trip_keeps_extras(tmp_path):
    factors = [[0.1 * i + j for j in range(3)] for i in range(5)]
    ours = KLVAE(**small_config(), latent_rgb_factors=factors)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "KLVAE"
    loaded = KLVAE.from_pretrained(tmp_path)
    assert loaded.config.latent_rgb_factors == factors
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ------------------------------------------------------------------ posterior
def moments(batch=2, channels=4, size=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(batch, 2 * channels, size, size + 1, generator=g)
    m[0, channels, 0, 0] = -80.0  # below the clamp
    m[-1, channels + 1, 1, 1] = 45.0  # above the clamp
    return m


def test_posterior_matches_diffusers():
    params, other_params = moments(seed=0), moments(seed=1)
    ours, ref = DiagonalGaussianDistribution(params), RefPosterior(params)
    other, ref_other = DiagonalGaussianDistribution(other_params), RefPosterior(other_params)
    assert ours.logvar.min().item() == -30.0 and ours.logvar.max().item() == 20.0
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert torch.equal(ours.mode(), ref.mode())
    assert torch.allclose(ours.kl(), ref.kl(), rtol=1e-5)
    assert ours.kl().shape == (2,)
    # other has logvar +45 → clamped to 20: var = e^20, ratios stay finite
    assert torch.allclose(ours.kl(other), ref.kl(ref_other), rtol=1e-5)
    x = torch.randn(params.shape[0], 4, 3, 4)
    assert torch.allclose(ours.nll(x), ref.nll(x), rtol=1e-5)
    assert torch.allclose(ours.nll(x, dims=[1, 2]), ref.nll(x, dims=[1, 2]), rtol=1e-5)
    sample = ours.sample(generator=torch.Generator().manual_seed(7))
    assert torch.equal(sample, ours.sample(generator=torch.Generator().manual_seed(7)))
    assert torch.equal(sample, ref.sample(generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(sample, ours.sample(generator=torch.Generator().manual_seed(8)))


def test_deterministic_posterior():
    params = moments()
    ours, ref = DiagonalGaussianDistribution(params, deterministic=True), RefPosterior(params, deterministic=True)
    assert torch.equal(ours.std, ref.std) and torch.equal(ours.var, ref.var)
    assert torch.equal(ours.sample(generator=torch.Generator().manual_seed(0)), ours.mean)
    assert torch.all(ours.kl() == 0)


def test_encoder_posterior_is_diffusers_interface():
    ours, _ = twin_models(small_config())
    post = ours.encode(torch.randn(1, 3, 8, 8)).latent_dist
    for name in ("sample", "mode", "kl", "nll", "mean", "logvar", "std", "var", "parameters"):
        assert hasattr(post, name), name
    (tuple_post,) = ours.encode(torch.randn(1, 3, 8, 8), return_dict=False)
    assert isinstance(tuple_post, type(post))
    (decoded,) = ours.decode(torch.randn(1, 4, 4, 4), return_dict=False)
    assert decoded.shape == (1, 3, 8, 8)


# ------------------------------------------------------------------ forward options
def test_forward_options():
    ours, ref = twin_models(small_config(levels=3))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = ours(x, sample_posterior=True, return_posterior=True, generator=torch.Generator().manual_seed(3))
        post = ref.encode(x).latent_dist
        z = post.sample(generator=torch.Generator().manual_seed(3))
        assert max_diff(out.sample, ref.decode(z).sample) <= TOL
        assert max_diff(out.latent_dist.mean, post.mean) <= TOL
        assert torch.allclose(out.latent_dist.kl(), post.kl(), rtol=1e-4)
        assert ours(x).latent_dist is None  # return_posterior defaults to False
        # tuples as diffusers returns them, plus the posterior when asked
        (plain,) = ours(x, return_dict=False)
        assert max_diff(plain, ref(x).sample) <= TOL
        rec, posterior = ours(x, return_dict=False, return_posterior=True)
        assert torch.equal(rec, plain) and max_diff(posterior.mean, post.mean) <= TOL

        mask = torch.ones(2, 1, 4, 4)
        mask[0, :, :2] = 0
        mask[1, :, :, 1:3] = 0.5
        masked = ours(x, latent_mask=mask).sample
        assert max_diff(masked, ref.decode(post.mode() * mask).sample) <= TOL
        assert max_diff(ours(x, latent_mask=torch.ones(2, 1, 4, 4)).sample, plain) == 0.0


def test_slicing_gives_the_same_outputs():
    ours, ref = twin_models(small_config(levels=3))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        whole_moments = ours.encode(x).latent_dist.parameters
        whole = ours(x).sample
        ours.enable_slicing()
        assert max_diff(ours.encode(x).latent_dist.parameters, whole_moments) <= 1e-5
        assert max_diff(ours(x).sample, whole) <= 1e-5
        ref.enable_slicing()
        assert max_diff(ours(x).sample, ref(x).sample) <= TOL
        ours.disable_slicing()
        assert ours.use_slicing is False


def test_gradient_checkpointing_gives_the_same_gradients():
    config = small_config(levels=3)
    ours, _ = twin_models(config)
    ours.train()
    twin = KLVAE(**config).train()
    twin.load_state_dict(ours.state_dict())
    twin.enable_gradient_checkpointing()
    assert twin.is_gradient_checkpointing
    x = torch.randn(2, 3, 16, 16)

    def grads(model):
        model.zero_grad()
        out = model(x, sample_posterior=True, return_posterior=True, generator=torch.Generator().manual_seed(0))
        loss = out.sample.square().mean() + 1e-3 * out.latent_dist.kl().mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    for module in twin.modules():  # count the checkpointed calls: the flag must really be used
        if hasattr(module, "_gradient_checkpointing_func"):
            fn = module._gradient_checkpointing_func
            module._gradient_checkpointing_func = lambda *a, _fn=fn, **k: (calls.append(1), _fn(*a, **k))[1]
    expected, got = grads(ours), grads(twin)
    assert calls, "enable_gradient_checkpointing() did not route any stage through checkpointing"
    assert expected.keys() == got.keys()
    for name in expected:
        assert max_diff(got[name], expected[name]) <= 1e-5, name


def test_dtype_and_device():
    ours = KLVAE(**small_config())
    assert ours.dtype == torch.float32 and ours.device == torch.device("cpu")
    ours.to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16


def test_half_precision_and_force_upcast_as_pipelines_use_it():
    """SD/SDXL pipelines: ``if vae.dtype == float16 and vae.config.force_upcast: vae.to(float32)``, then latents are cast
    to ``post_quant_conv``'s dtype and decoded; afterwards the VAE goes back to float16."""
    ours, ref = twin_models(small_config(levels=3))
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        expected = ref.decode(z).sample
        ours.to(torch.float16)
        assert ours.dtype == torch.float16 and ours.config.force_upcast is True
        if ours.dtype == torch.float16 and ours.config.force_upcast:
            ours.to(dtype=torch.float32)
        latents = z.half().to(next(iter(ours.post_quant_conv.parameters())).dtype)
        assert latents.dtype == torch.float32
        assert max_diff(ours.decode(latents).sample, expected) <= 1e-2  # only the fp16 rounding of z remains
        ours.to(torch.float16)

        # bf16 end to end (CPU supports it): same numbers as diffusers in bf16, close to fp32
        ours.to(torch.bfloat16)
        ref.to(torch.bfloat16)
        x = torch.randn(1, 3, 16, 16, dtype=torch.bfloat16)
        out, ref_out = ours(x).sample, ref(x).sample
        assert out.dtype == torch.bfloat16
        assert max_diff(out.float(), ref_out.float()) <= 0.05 * ref_out.float().abs().max().item()


def test_decoder_runs_with_only_the_mid_block_in_fp32():
    """Older pipelines' ``upcast_vae`` put only ``post_quant_conv``, ``decoder.conv_in`` and ``decoder.mid_block`` in
    float32 and relied on the decoder casting back to the up blocks' dtype after the mid block."""
    ours, ref = twin_models(small_config(levels=3))
    ours.to(torch.bfloat16)
    for module in (ours.post_quant_conv, ours.decoder.conv_in, ours.decoder.mid_block):
        module.to(torch.float32)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        out, ref_out = ours.decode(z).sample, ref.decode(z).sample
    assert out.dtype == torch.bfloat16
    assert max_diff(out.float(), ref_out.float()) <= 0.05 * ref_out.float().abs().max().item()


def test_tiling_calls_keep_diffusers_signature():
    ours, ref = twin_models(small_config(sample_size=16))
    ours.enable_tiling()  # diffusers' no-argument call
    assert ours.use_tiling
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        untiled = ref(x).sample
        tiled = ours(x).sample
    assert tiled.shape == untiled.shape and torch.isfinite(tiled).all()
    ours.disable_tiling()
    with torch.no_grad():
        assert max_diff(ours(x).sample, untiled) <= TOL


@pytest.mark.parametrize("name", ["f4", "non-square-batch3"])
def test_parity_on_the_large_map_inference_path(name, monkeypatch):
    """blocks.py runs large float32 maps in inference through a memory-saving row-band path (at SD size it starts at
    256²). Lower its threshold so that tiny inputs take it, and hold it to the same parity."""
    from diffusers_klvae.models import blocks

    monkeypatch.setattr(blocks, "BAND_ELEMENTS", 1024, raising=False)  # a no-op if the path is ever renamed
    config, shape = PARITY_CASES[name]
    ours, ref = twin_models(config)
    assert_parity(ours, ref, torch.randn(shape))
