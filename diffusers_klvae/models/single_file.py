"""Original LDM/CompVis single-file VAE checkpoints ⇄ diffusers key layout, without the Hub.

LDM names (``encoder.down.0.block.1.nin_shortcut``, ``decoder.up.3.upsample.conv``, ``mid.attn_1.q`` as a 1×1 conv)
map one-to-one onto diffusers' (``encoder.down_blocks.0.resnets.1.conv_shortcut``, ``decoder.up_blocks.0.upsamplers.0.conv``,
``mid_block.attentions.0.to_q`` as a linear layer). LDM's decoder lists its levels from the highest resolution,
diffusers' from the lowest: ``up.{i}`` ⇄ ``up_blocks.{levels - 1 - i}``.
"""

from __future__ import annotations

import os
import re

import torch

from .config import EXTRA_CONFIG_DEFAULTS

PREFIXES = ("first_stage_model.", "vae.", "model.")  # SD full checkpoints, some VAE-only exports, Lightning modules
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# attention projection weights, named in either layout
_PROJECTION = re.compile(r"\.mid(_block\.attentions\.0|\.attn_1)\.(to_q|to_k|to_v|to_out\.0|q|k|v|proj_out)\.weight$")
_TOP_LEVEL = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# The architecture that ComfyUI and AUTOMATIC1111 build for a VAE file, whatever it holds (ComfyUI's ddconfig:
# ch 128, ch_mult 1,2,4,4, 2 res blocks, SiLU, 32 groups, attention in the mid blocks), in KLVAE config keys.
SD_ARCHITECTURE = dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                       act_fn="silu", latent_channels=4, norm_num_groups=32, use_quant_conv=True,
                       use_post_quant_conv=True, mid_block_add_attention=True, encoder_squeeze_excitation=False)
# (down/up block types follow: KLVAE allows only DownEncoderBlock2D/UpDecoderBlock2D, one per block_out_channels entry)
# ComfyUI reads z_channels from decoder.conv_in and, without post_quant_conv, builds the 16-channel SD3/FLUX layout.
SD_ARCHITECTURE_16CH = {**SD_ARCHITECTURE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` or pickle ``.ckpt``/``.pt``/``.bin`` file → its state dict, with VAE keys only and no prefix."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:  # pickle: tensors and plain containers only, never arbitrary objects
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors")
    return _strip_prefix(state, path)


def _strip_prefix(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    vae_keys = {k: v for k, v in state.items() if k.startswith(_TOP_LEVEL)}
    if not any(k.startswith("encoder.") for k in vae_keys):
        first = next(iter(state), "<empty>")
        raise ValueError(f"{path!r} is not a VAE checkpoint: no 'encoder.*' keys with prefix {', '.join(PREFIXES)} or none "
                         f"(first key: {first!r})")
    return vae_keys


def _ldm_to_diffusers_key(key: str, levels: int) -> str:
    key = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.", lambda m: f"{m[1]}.mid_block.attentions.0.{_ATTN[m[2]]}.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.", key)
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def _diffusers_to_ldm_key(key: str, levels: int) -> str:
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}", key)
    inverse = {v: k for k, v in _ATTN.items()}
    key = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.", lambda m: f"{m[1]}.mid.attn_1.{inverse[m[2]]}.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    return re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)


def _convert(state: dict[str, torch.Tensor], rename, levels: int, ndim: int) -> dict[str, torch.Tensor]:
    """``state`` with keys renamed, and attention projection weights (1×1 convs in LDM, linear in diffusers) of the
    other layout reshaped to ``ndim`` dimensions."""
    out = {}
    for key, value in state.items():
        other_layout_ndim = 4 if ndim == 2 else 2  # 1×1 conv (LDM) vs linear (diffusers)
        if value.ndim == other_layout_ndim and _PROJECTION.search(key):
            value = value[:, :, 0, 0] if ndim == 2 else value[:, :, None, None]
        out[rename(key, levels)] = value
    return out


def ldm_to_diffusers(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """LDM-layout VAE state dict → diffusers layout (1×1-conv attention weights become linear)."""
    return _convert(state, _ldm_to_diffusers_key, levels, ndim=2)


def diffusers_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers-layout VAE state dict → LDM layout (linear attention weights become 1×1 convs)."""
    return _convert(state, _diffusers_to_ldm_key, levels, ndim=4)


def checkpoint_state_dict(source, *, revision: str | None = None, disable_mmap: bool = False,
                          **hub) -> dict[str, torch.Tensor]:
    """A state dict, a local checkpoint file, or a Hub file URL (``https://huggingface.co/<repo>/blob/<rev>/<file>``,
    downloaded with diffusers' ``load_single_file_checkpoint`` and its ``hub`` options) → its VAE keys, no prefix."""
    if isinstance(source, dict):
        if not all(isinstance(v, torch.Tensor) for v in source.values()):
            raise ValueError("the state dict must map keys to tensors")
        return _strip_prefix(source.get("state_dict", source), "the state dict")
    from diffusers.loaders.single_file_utils import VALID_URL_PREFIXES, load_single_file_checkpoint

    if not os.fspath(source).startswith(tuple(VALID_URL_PREFIXES)):
        return read_checkpoint(source)

    state = load_single_file_checkpoint(os.fspath(source), revision=revision, disable_mmap=disable_mmap, **hub)
    return _strip_prefix(state, os.fspath(source))


def load_single_file_into(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str = "the checkpoint") -> None:
    """Convert an LDM-layout (or diffusers-layout) state dict and load it into ``model``; errors name the first
    offending key as ``source`` holds it."""
    levels = len(model.config.block_out_channels)
    file_key = {_ldm_to_diffusers_key(k, levels): k for k in state}  # errors name the key as the user sees it
    state = ldm_to_diffusers(state, levels)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model config: {len(missing)} missing keys "
                         f"(first: {missing[0] if missing else None!r}), {len(unexpected)} unexpected keys "
                         f"(first: {unexpected[0] if unexpected else None!r}); pass config= for a non-default architecture")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"shape mismatch at {file_key[key]!r} (model key {key!r}): checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}; "
                             f"pass config= matching the checkpoint (block_out_channels, latent_channels, ...)")
    model.load_state_dict(state, strict=True)


def single_file_mismatches(config) -> dict[str, tuple]:
    """Config keys whose values the original-layout loaders would not honour → (value, value they build).

    ComfyUI builds the SD KL-f8 architecture whatever the file holds and loads with ``strict=False`` (a 16-channel
    file without quant convs is the one variant it detects); AUTOMATIC1111 loads strictly into SD's VAE. A file of
    another architecture fails there, or loads and decodes wrong (a different activation or group count loads with
    every key matching)."""
    config = {**EXTRA_CONFIG_DEFAULTS, **config}  # a diffusers AutoencoderKL's config has no KLVAE-only keys
    target = SD_ARCHITECTURE_16CH if config.get("latent_channels") == 16 else SD_ARCHITECTURE
    return {key: (_plain(config.get(key)), want) for key, want in target.items() if _plain(config.get(key)) != want}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def write_ldm_file(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s weights in the original LDM layout as ``.safetensors`` (no prefix), whatever the
    architecture (``KLVAE.save_single_file`` checks it first)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_single_file writes .safetensors only; got {path!r}")
    levels = len(model.config.block_out_channels)
    state = diffusers_to_ldm({k: v.detach().contiguous() for k, v in model.state_dict().items()}, levels)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(state, path, metadata={"format": "pt"})
