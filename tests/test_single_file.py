"""Original LDM/CompVis single-file VAE checkpoints, checked against diffusers' own LDM → diffusers converter."""

from __future__ import annotations

import re

import huggingface_hub
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # internal API: tests only
from safetensors.torch import load_file, save_file

from diffusers_klvae import KLVAE, preset_config

ATTN_LDM = ("q", "k", "v", "proj_out")


def tiny_config(**overrides) -> dict:
    return {**preset_config("tiny"), **overrides}


def f4_config(**overrides) -> dict:
    """Three levels: exercises the up.{i} ⇄ up_blocks.{levels-1-i} reversal beyond a swap of two."""
    base = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4)
    return {**base, **overrides}


def randomized(model: KLVAE, seed: int = 0) -> KLVAE:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def ldm_state(model: KLVAE, tmp_path) -> dict[str, torch.Tensor]:
    path = tmp_path / "ldm.safetensors"
    model.save_single_file(path, force=True)  # tiny test architectures: not a ComfyUI/A1111 file
    return load_file(path)


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("config_fn", [tiny_config, f4_config])
def test_saved_single_file_is_what_diffusers_converter_reads(config_fn, tmp_path):
    config = config_fn()
    model = randomized(KLVAE(**config))
    ldm = ldm_state(model, tmp_path)
    # original layout: no prefix, LDM names, attention as 1×1 convs
    assert all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in ldm)
    assert "encoder.down.0.block.0.conv1.weight" in ldm and "decoder.up.0.block.1.conv2.weight" in ldm
    assert "decoder.up.1.upsample.conv.weight" in ldm and "encoder.norm_out.weight" in ldm
    assert not any("down_blocks" in k or "up_blocks" in k or "to_q" in k for k in ldm)
    for part in ("encoder", "decoder"):
        for name in ATTN_LDM:
            assert ldm[f"{part}.mid.attn_1.{name}.weight"].ndim == 4
    reference = convert_ldm_vae_checkpoint(ldm, config)
    assert_same_state(reference, model.state_dict())


@pytest.mark.parametrize("fmt, prefix", [("safetensors", "first_stage_model."), ("safetensors", "vae."), ("safetensors", ""),
                                         ("ckpt-state_dict", "first_stage_model."), ("ckpt-state_dict", ""),
                                         ("ckpt-plain", "vae.")])
def test_from_single_file_formats_and_prefixes(prefix, fmt, tmp_path):
    config = f4_config()
    model = randomized(KLVAE(**config))
    ldm = ldm_state(model, tmp_path)
    full = {prefix + k: v for k, v in ldm.items()}
    if prefix == "first_stage_model.":  # a whole SD checkpoint: UNet and text encoder keys beside the VAE
        full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2, 2)
        full["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(3)
    if fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(full, path)
    else:
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": full, "global_step": 3} if fmt == "ckpt-state_dict" else full, path)
    loaded = KLVAE.from_single_file(path, config=config)
    expected = convert_ldm_vae_checkpoint(full, config)  # diffusers strips the prefix itself
    assert_same_state(loaded.state_dict(), expected)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).sample, model.eval()(x).sample)


def test_attention_linear_and_conv_layouts(tmp_path):
    model = randomized(KLVAE(**tiny_config()))
    ldm = ldm_state(model, tmp_path)
    for ldm_name, ours in zip(ATTN_LDM, ("to_q", "to_k", "to_v", "to_out.0")):
        linear = model.state_dict()[f"decoder.mid_block.attentions.0.{ours}.weight"]
        assert linear.ndim == 2
        assert torch.equal(ldm[f"decoder.mid.attn_1.{ldm_name}.weight"], linear[:, :, None, None])
    # files that already store linear attention weights (some exports do) load too
    flat = {k: (v[:, :, 0, 0] if v.ndim == 4 and ".attn_1." in k and not k.endswith("norm.weight") else v) for k, v in ldm.items()}
    save_file(flat, tmp_path / "flat.safetensors")
    assert_same_state(KLVAE.from_single_file(tmp_path / "flat.safetensors", config=tiny_config()).state_dict(), model.state_dict())


def test_single_file_round_trip_and_default_sd_config(tmp_path):
    model = KLVAE.from_preset("sd-kl-f8")
    path = tmp_path / "vae.safetensors"
    model.save_single_file(path)
    loaded = KLVAE.from_single_file(path)  # no config: SD KL-f8 built in
    assert dict(loaded.config) == dict(model.config)
    assert_same_state(loaded.state_dict(), model.state_dict())
    with pytest.raises(ValueError, match=r"\.safetensors"):
        model.save_single_file(tmp_path / "vae.ckpt")


def test_config_as_dict_folder_or_preset(tmp_path):
    model = randomized(KLVAE(**tiny_config(scaling_factor=0.5)))
    path = tmp_path / "tiny.safetensors"
    model.save_single_file(path, force=True)
    model.save_pretrained(tmp_path / "folder")
    by_dict = KLVAE.from_single_file(path, config=dict(model.config))
    by_folder = KLVAE.from_single_file(path, config=tmp_path / "folder")
    by_file = KLVAE.from_single_file(path, config=tmp_path / "folder" / "config.json")
    by_preset = KLVAE.from_single_file(path, config="tiny")
    for loaded in (by_dict, by_folder, by_file, by_preset):
        assert_same_state(loaded.state_dict(), model.state_dict())
    assert by_dict.config.scaling_factor == by_folder.config.scaling_factor == 0.5
    assert by_preset.config.scaling_factor == preset_config("tiny").get("scaling_factor", 0.18215)
    assert KLVAE.from_single_file(path, config="tiny", scaling_factor=0.25).config.scaling_factor == 0.25


def test_not_a_vae_file_names_the_key(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match=r"not a VAE checkpoint.*model\.diffusion_model\.input_blocks\.0\.0\.weight"):
        KLVAE.from_single_file(path, config="tiny")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        KLVAE.from_single_file(tmp_path / "missing.safetensors", config="tiny")


def test_shape_mismatch_names_the_first_offending_key(tmp_path):
    model = KLVAE(**tiny_config(block_out_channels=(8, 32)))
    path = tmp_path / "wide.safetensors"
    model.save_single_file(path, force=True)
    with pytest.raises(ValueError) as err:
        KLVAE.from_single_file(path, config="tiny")
    message = str(err.value)
    named = re.search(r"'([\w.]+)'", message)
    assert named, message
    ldm, ours = load_file(path), KLVAE(**tiny_config()).state_dict()
    converted = convert_ldm_vae_checkpoint(ldm, tiny_config())
    key = named[1]
    shapes = (ldm[key].shape, None) if key in ldm else (converted[key].shape, ours[key].shape)
    assert shapes[0] != (ours.get(key, converted.get(key)).shape if shapes[1] is None else shapes[1]), message
    assert "(32" in message and "(16" in message


def test_architecture_mismatch_names_a_missing_key(tmp_path):
    model = KLVAE(**f4_config())
    path = tmp_path / "f4.safetensors"
    model.save_single_file(path, force=True)
    with pytest.raises(ValueError) as err:
        KLVAE.from_single_file(path, config="tiny")
    assert "unexpected" in str(err.value) and "config=" in str(err.value)


# ------------------------------------------------------------------ argument parity with AutoencoderKL.from_single_file
def hub_cache(tmp_path, repo_id: str, files: dict[str, bytes]) -> str:
    """A Hugging Face cache holding one snapshot of ``repo_id`` (what a download leaves behind), so that Hub ids and
    URLs resolve offline with ``local_files_only=True``."""
    cache = tmp_path / "hf-cache"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(cache)


def assert_same_model(ours: KLVAE, ref, dtype: torch.dtype = torch.float32) -> None:
    """Same config values, weights, dtype and mode as diffusers' model."""
    private = ("_name_or_path", "_class_name", "_diffusers_version", "_use_default_values")
    ref_config = {k: v for k, v in ref.config.items() if k not in private}
    assert {k: v for k, v in ours.config.items() if k in ref_config} == ref_config
    assert_same_state(ours.state_dict(), ref.state_dict())
    assert ours.dtype == ref.dtype == dtype
    assert not ours.training and not ref.training


@pytest.fixture
def published(tmp_path):
    """A tiny model saved as a pipeline-style repo: vae/config.json and an original-layout file at the root."""
    model = randomized(KLVAE(**tiny_config(scaling_factor=0.5)))
    model.save_pretrained(tmp_path / "repo" / "vae")
    model.save_single_file(tmp_path / "repo" / "vae.safetensors", force=True)
    return model, tmp_path / "repo"


def test_from_single_file_local_arguments_match_diffusers(published):
    from diffusers import AutoencoderKL

    _, repo = published
    path = str(repo / "vae.safetensors")
    for kwargs in ({"config": str(repo), "subfolder": "vae"}, {"config": str(repo / "vae"), "torch_dtype": torch.float16},
                   {"config": str(repo / "vae"), "dtype": torch.bfloat16, "scaling_factor": 0.25}):
        ours, ref = KLVAE.from_single_file(path, **kwargs), AutoencoderKL.from_single_file(path, **kwargs)
        assert_same_model(ours, ref, kwargs.get("torch_dtype", kwargs.get("dtype", torch.float32)))
    assert ours.config.scaling_factor == 0.25
    # a state dict instead of a file, with the SD checkpoint prefix
    state = {f"first_stage_model.{k}": v for k, v in load_file(path).items()}
    ours = KLVAE.from_single_file(state, config=str(repo), subfolder="vae")
    assert_same_model(ours, AutoencoderKL.from_single_file(state, config=str(repo), subfolder="vae"))


def test_from_single_file_hub_url_and_repo_config_match_diffusers(published, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    _, repo = published
    cache = hub_cache(tmp_path, "someone/tiny-vae", {"vae/config.json": (repo / "vae" / "config.json").read_bytes(),
                                                    "vae.safetensors": (repo / "vae.safetensors").read_bytes()})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)  # diffusers loads the config from there
    url = "https://huggingface.co/someone/tiny-vae/blob/main/vae.safetensors"
    kwargs = dict(config="someone/tiny-vae", subfolder="vae", local_files_only=True)
    ours, ref = KLVAE.from_single_file(url, **kwargs), AutoencoderKL.from_single_file(url, **kwargs)
    assert_same_model(ours, ref)
    assert ours.config.scaling_factor == 0.5  # read from the Hub config, not the default SD config
    with pytest.raises(ValueError, match="someone/missing"):
        KLVAE.from_single_file(url, config="someone/missing", local_files_only=True)


def test_from_single_file_rejects_unknown_arguments(published):
    _, repo = published
    with pytest.raises(TypeError, match="scaling_facter"):
        KLVAE.from_single_file(repo / "vae.safetensors", config="tiny", scaling_facter=0.3)
    with pytest.raises(TypeError, match="torch.dtype"):
        KLVAE.from_single_file(repo / "vae.safetensors", config="tiny", torch_dtype="float16")


# ------------------------------------------------------------------ what save_single_file refuses
def meta_model(**overrides) -> KLVAE:
    """An SD KL-f8 model with ``overrides`` on the meta device: save_single_file decides before reading weights."""
    with torch.device("meta"):
        return KLVAE(**{**preset_config("sd-kl-f8"), **overrides})


@pytest.mark.parametrize("overrides, named", [
    ({"act_fn": "gelu"}, "act_fn='gelu' (needs 'silu')"),  # would load in ComfyUI with every key matching
    ({"norm_num_groups": 16}, "norm_num_groups=16 (needs 32)"),  # idem
    ({"mid_block_add_attention": False}, "mid_block_add_attention=False (needs True)"),
    ({"layers_per_block": 1}, "layers_per_block=1 (needs 2)"),
    ({"use_quant_conv": False}, "use_quant_conv=False (needs True)"),
    ({"encoder_squeeze_excitation": True}, "encoder_squeeze_excitation=True (needs False)"),
    ({"latent_channels": 16}, "use_quant_conv=True (needs False)"),  # ComfyUI detects 16 channels without quant convs
    (preset_config("small"), "block_out_channels=[32, 64, 128, 128] (needs [128, 256, 512, 512])"),
])
def test_save_single_file_refuses_what_comfyui_and_a1111_decode_wrong(overrides, named, tmp_path):
    path = tmp_path / "vae.safetensors"
    with pytest.raises(ValueError, match=re.escape(named)):
        meta_model(**overrides).save_single_file(path)
    assert not path.exists()


def test_save_single_file_accepts_the_sd_architectures_and_force_writes_any(tmp_path):
    from diffusers_klvae.models.single_file import single_file_mismatches

    for name in ("sd-kl-f8", "sdxl", "kl-f8-16ch"):
        assert single_file_mismatches(KLVAE(**tiny_config()).config) and not single_file_mismatches(meta_model(**preset_config(name)).config)
    model = randomized(KLVAE(**tiny_config(act_fn="gelu")))
    model.save_single_file(tmp_path / "gelu.safetensors", force=True)  # for tools that read the config beside it
    loaded = KLVAE.from_single_file(tmp_path / "gelu.safetensors", config=dict(model.config))
    assert_same_state(loaded.state_dict(), model.state_dict())


def test_from_single_file_original_config_matches_diffusers(tmp_path):
    from diffusers import AutoencoderKL

    levels = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    model = randomized(KLVAE(**levels, block_out_channels=(32, 64), layers_per_block=1))  # 32 groups: LDM's default
    path = tmp_path / "ldm.safetensors"
    model.save_single_file(path, force=True)
    ddconfig = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, in_channels=3, out_ch=3, z_channels=4)
    original = {"model": {"params": {"scale_factor": 0.3, "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    ours, ref = (cls.from_single_file(str(path), original_config=original) for cls in (KLVAE, AutoencoderKL))
    assert_same_model(ours, ref)
    assert ours.config.scaling_factor == 0.3
    with pytest.raises(ValueError, match="not both"):
        KLVAE.from_single_file(path, config="tiny", original_config=original)
