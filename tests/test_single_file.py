"""Original LDM/CompVis single-file VAE checkpoints, checked against diffusers' own LDM → diffusers converter."""

from __future__ import annotations

import re

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
    model.save_single_file(path)
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
    model.save_single_file(path)
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
    model.save_single_file(path)
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
    model.save_single_file(path)
    with pytest.raises(ValueError) as err:
        KLVAE.from_single_file(path, config="tiny")
    assert "unexpected" in str(err.value) and "config=" in str(err.value)
