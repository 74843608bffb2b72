"""diffusers' model API on KLVAE, checked against AutoencoderKL side by side: what diffusers' own AutoencoderKL test
suite exercises and KLVAE once failed (layerwise casting, PEFT adapters, attention processors, fused QKV, gradient
checkpointing), plus group offloading, and that these keep the row-band and tiled paths correct."""

from __future__ import annotations

import tempfile

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

from diffusers_klvae import KLVAE
from diffusers_klvae.models import blocks

CONFIG = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
# (storage, compute) pairs of diffusers' test_layerwise_casting_inference/_training
CASTING = [(torch.float16, torch.float32), (torch.float8_e4m3fn, torch.float32), (torch.float8_e5m2, torch.float32),
           (torch.float8_e4m3fn, torch.bfloat16)]
CASTING_IDS = ["fp16-fp32", "fp8e4m3-fp32", "fp8e5m2-fp32", "fp8e4m3-bf16"]


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """Weights with non-trivial norm gains and biases, shared by both classes."""
    g = torch.Generator().manual_seed(0)
    ref = AutoencoderKL(**CONFIG)
    return {k: torch.randn(v.shape, generator=g) * 0.2 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
            for k, v in ref.state_dict().items()}


def make(cls, state, **config):
    model = cls(**{**CONFIG, **config}).eval()
    model.load_state_dict(state)
    return model


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture
def small_bands(monkeypatch):
    """Every map of the tiny model counts as large: inference takes the row-band path, in many bands."""
    monkeypatch.setattr(blocks, "BAND_ELEMENTS", 2**9)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------ layerwise casting
@pytest.mark.parametrize("storage, compute", CASTING, ids=CASTING_IDS)
def test_layerwise_casting_inference_matches_autoencoderkl(state, image, storage, compute):
    ours, ref = (make(cls, state).to(compute) for cls in (KLVAE, AutoencoderKL))
    for model in (ours, ref):
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
    for name, module in ours.named_modules():  # what diffusers' test checks: layers stored narrow, norms not
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            assert module.weight.dtype == storage, name
        elif isinstance(module, torch.nn.GroupNorm):
            assert module.weight.dtype == compute, name
    with torch.no_grad():
        got, want = ours(image.to(compute)).sample, ref(image.to(compute)).sample
    assert got.dtype == compute and torch.isfinite(got).all()
    assert max_diff(got, want) <= 1e-5 * want.float().abs().max().item()


@pytest.mark.parametrize("storage", [torch.float16, torch.float8_e4m3fn])
def test_layerwise_casting_keeps_band_and_tiled_paths_exact(state, image, storage, monkeypatch):
    """Stored in ``storage`` and computed in float32, the model computes with the weights rounded to ``storage``:
    the plain, row-band and tiled paths each give what a float32 model holding those rounded weights gives."""
    rounded = {k: (v if "norm" in k else v.to(storage).float()) for k, v in state.items()}
    cast, plain = make(KLVAE, state), make(KLVAE, rounded)
    cast.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    with torch.no_grad():
        for setup in ("plain", "bands", "tiled"):
            if setup == "bands":
                monkeypatch.setattr(blocks, "BAND_ELEMENTS", 2**9)
            if setup == "tiled":
                for model in (cast, plain):
                    model.enable_tiling(tile_sample_min_size=16)
            got, want = cast(image).sample, plain(image).sample
            assert max_diff(got, want) <= 1e-5, setup


@pytest.mark.parametrize("storage, compute", CASTING[:3], ids=CASTING_IDS[:3])  # bf16 compute: not on CPU (as there)
def test_layerwise_casting_training_matches_autoencoderkl(state, image, storage, compute):
    losses = []
    for cls in (KLVAE, AutoencoderKL):
        model = make(cls, state).to(compute)
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
        model.train()
        with torch.amp.autocast(device_type="cpu"):
            out = model(image.to(compute)).sample
            loss = torch.nn.functional.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
        loss.backward()
        losses.append(loss.item())
        assert model.encoder.conv_in.weight.grad is not None
    # autocast computes the convs in bfloat16 (CPU): the two classes' losses agree to one bfloat16 step (2**-8)
    assert losses[0] == pytest.approx(losses[1], rel=2**-8)


# ------------------------------------------------------------------ PEFT adapters
def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
                      init_lora_weights=False)


def test_lora_adapter_add_save_load_matches_autoencoderkl(state, image, small_bands, tmp_path):
    """A LoRA on the attention and the resnet convs changes the output as it does AutoencoderKL's, also in the row-band
    path (which must call the adapted convs, not read their base weights), and survives save/unload/load."""
    from peft.utils import get_peft_model_state_dict

    ours, ref = make(KLVAE, state), make(AutoencoderKL, state)
    with torch.no_grad():
        before = ours(image).sample
    for model in (ours, ref):
        torch.manual_seed(0)  # the same random LoRA weights in both
        model.add_adapter(lora_config())
    with torch.no_grad():
        adapted, want = ours(image).sample, ref(image).sample
    assert max_diff(adapted, before) > 1e-3
    assert max_diff(adapted, want) <= 1e-5

    ours.save_lora_adapter(tmp_path)
    saved = get_peft_model_state_dict(ours)
    ours.unload_lora()
    with torch.no_grad():
        assert max_diff(ours(image).sample, before) <= 1e-6
    ours.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
    loaded = get_peft_model_state_dict(ours, adapter_name="default_0")
    assert sorted(loaded) == sorted(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    with torch.no_grad():
        assert max_diff(ours(image).sample, adapted) <= 1e-6


# ------------------------------------------------------------------ attention processors
def test_attention_processors_as_autoencoderkl(state, image):
    ours, ref = make(KLVAE, state), make(AutoencoderKL, state)
    assert list(ours.attn_processors) == list(ref.attn_processors)  # same module paths, same default processor
    assert all(type(p) is AttnProcessor2_0 for p in ours.attn_processors.values())
    with torch.no_grad():
        default = ours(image).sample
        ours.set_default_attn_processor()
        ref.set_default_attn_processor()
        assert all(type(p) is AttnProcessor for p in ours.attn_processors.values())
        assert max_diff(ours(image).sample, ref(image).sample) <= 1e-5
        assert max_diff(ours(image).sample, default) <= 1e-5

        calls = []

        class Counting(AttnProcessor2_0):
            def __call__(self, attn, hidden_states, *args, **kwargs):
                calls.append(attn)
                return super().__call__(attn, hidden_states, *args, **kwargs)

        ours.set_attn_processor({name: Counting() for name in ours.attn_processors})
        assert max_diff(ours(image).sample, default) <= 1e-5
    assert len(calls) == len(ours.attn_processors) == 2  # forward runs the encoder's and the decoder's attention


def test_upcast_vae_of_a_pipeline_keeps_the_mid_block_in_half_precision(state):
    """AnimateDiffSDXLPipeline.upcast_vae reads the processor type and keeps conv_in and the mid block in fp16, as for
    AutoencoderKL; KLVAE then decodes fp16 latents (the up blocks in fp32) close to the fp32 model."""
    from types import SimpleNamespace

    from diffusers import AnimateDiffSDXLPipeline

    dtypes = []
    for cls in (KLVAE, AutoencoderKL):
        pipe = SimpleNamespace(vae=make(cls, state).half())
        AnimateDiffSDXLPipeline.upcast_vae(pipe)
        dtypes.append({name: p.dtype for name, p in pipe.vae.named_parameters()})
    assert dtypes[0] == dtypes[1]
    assert dtypes[0]["decoder.mid_block.attentions.0.to_q.weight"] == torch.float16
    assert dtypes[0]["decoder.up_blocks.0.resnets.0.conv1.weight"] == torch.float32
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = make(KLVAE, state).half(), make(KLVAE, state)
        pipe = SimpleNamespace(vae=got)
        AnimateDiffSDXLPipeline.upcast_vae(pipe)
        got, want = got.decode(z.half()).sample, want.decode(z).sample
    assert got.dtype == torch.float32 and max_diff(got, want) <= 1e-2 * want.abs().max().item()


def test_fused_qkv_projections(state, image):
    ours, ref = make(KLVAE, state), make(AutoencoderKL, state)
    keys = sorted(ours.state_dict())
    with torch.no_grad():
        before = ours(image).sample
        for model in (ours, ref):
            model.fuse_qkv_projections()
        assert all(type(p) is FusedAttnProcessor2_0 for p in ours.attn_processors.values())
        assert ours.decoder.mid_block.attentions[0].to_qkv.weight.shape == (48, 16)
        fused = ours(image).sample
        assert max_diff(fused, before) <= 1e-5 and max_diff(fused, ref(image).sample) <= 1e-5
        ours.unfuse_qkv_projections()
    assert all(type(p) is AttnProcessor2_0 for p in ours.attn_processors.values())
    assert sorted(ours.state_dict()) == keys  # no fused weights left to save


def test_gradient_checkpointing_applies_to_the_same_blocks(state):
    names = []
    for cls in (KLVAE, AutoencoderKL):
        model = make(cls, state)
        model.enable_gradient_checkpointing()
        names.append({type(m).__name__ for m in model.modules() if getattr(m, "gradient_checkpointing", False)})
    assert names[0] == names[1] == {"Encoder", "Decoder", "UNetMidBlock2D"}


# ------------------------------------------------------------------ group offloading (CPU: offload to disk)
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("path", ["plain", "bands"])
def test_group_offloading_to_disk(state, image, offload_type, path, monkeypatch):
    """Weights offloaded to disk are loaded by the hooks of the modules that use them: the layer-by-layer stages and
    the row-band path must call those modules (and read GroupNorm weights inside their call)."""
    with torch.no_grad():
        want = make(KLVAE, state)(image).sample
    if path == "bands":
        monkeypatch.setattr(blocks, "BAND_ELEMENTS", 2**9)
    model = make(KLVAE, state)
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
        model.enable_group_offload(torch.device("cpu"), offload_type=offload_type, offload_to_disk_path=folder, **extra)
        got = model(image).sample
    assert max_diff(got, want) <= 1e-5


def test_group_offloading_with_tiling(state, image):
    with torch.no_grad():
        tiled = make(KLVAE, state)
        tiled.enable_tiling(tile_sample_min_size=16)
        want = tiled(image).sample
        for offload_type in ("leaf_level", "block_level"):
            model = make(KLVAE, state)
            model.enable_tiling(tile_sample_min_size=16)
            with tempfile.TemporaryDirectory() as folder:
                extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
                model.enable_group_offload(torch.device("cpu"), offload_type=offload_type,
                                           offload_to_disk_path=folder, **extra)
                if offload_type == "leaf_level":
                    assert max_diff(model(image).sample, want) <= 1e-5
                else:  # tiling never calls the encoder's forward, where block-level offloading loads its weights
                    with pytest.raises(ValueError, match="leaf_level"):
                        model(image)


# ------------------------------------------------------------------ public tiled_encode / tiled_decode
def test_tiled_encode_and_decode_are_public(state):
    model = make(KLVAE, state)
    model.tile_sample_min_size, model.tile_latent_min_size = 16, 8  # tiles smaller than the input
    x = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        posterior = model.tiled_encode(x).latent_dist
        (decoded,) = model.tiled_decode(posterior.mode(), return_dict=False)
        model.enable_tiling()
        assert torch.equal(posterior.mean, model.encode(x).latent_dist.mean)
        assert torch.equal(decoded, model.decode(posterior.mode()).sample)
        model.disable_tiling()
        untiled = model.encode(x).latent_dist.mean
    assert posterior.mean.shape == untiled.shape and not torch.equal(posterior.mean, untiled)  # tiles were used
