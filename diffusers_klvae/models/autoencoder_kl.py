"""KLVAE: the KL-regularized autoencoder of latent diffusion, in one class.

To a pipeline or a checkpoint it is diffusers' ``AutoencoderKL``: same config names and defaults, same weight keys,
same outputs. On top, opt-in extras (off by default so that default configs stay AutoencoderKL-identical):
presets, squeeze-and-excitation in the encoder, seam-free tiling, original-LDM single files, a stored latent preview.
References: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022);
diffusers ``models/autoencoders/autoencoder_kl.py``.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import (
    ADDED_KV_ATTENTION_PROCESSORS,
    CROSS_ATTENTION_PROCESSORS,
    AttnAddedKVProcessor,
    AttnProcessor,
    FusedAttnProcessor2_0,
)
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .blocks import ACTIVATIONS, Decoder, Encoder, _hooked
from .posterior import DiagonalGaussianDistribution
from .presets import list_presets, preset_config

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
# On disk, an SE model's down blocks carry this name, so that plain AutoencoderKL refuses the folder loudly
# ("... does not exist") instead of silently dropping the gates.
SE_DOWN_BLOCK_TYPE = "SqueezeExcitationDownEncoderBlock2D(needs diffusers_klvae.KLVAE)"
# KLVAE-only config keys and their defaults: at these values a saved folder is a plain AutoencoderKL folder.
EXTRA_CONFIG_DEFAULTS = {"encoder_squeeze_excitation": False, "latent_rgb_factors": None}


@dataclass
class KLVAEOutput(DecoderOutput):
    """Output of ``KLVAE.forward``.

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`): the reconstruction.
        latent_dist (`DiagonalGaussianDistribution`, *optional*): the posterior, when ``return_posterior=True``.
    """

    latent_dist: DiagonalGaussianDistribution | None = None


class KLVAE(ModelMixin, AttentionMixin, AutoencoderMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    A VAE with KL loss: images → diagonal Gaussian latents → images. Config and weights are interchangeable with
    diffusers' [`AutoencoderKL`], and so is the model API: [`ModelMixin`] (loading, saving, layerwise casting, group
    offloading, gradient checkpointing), attention processors ([`AttentionMixin`]), PEFT adapters
    ([`PeftAdapterMixin`]: ``add_adapter``, ``load_lora_adapter`` ...), slicing and tiling ([`AutoencoderMixin`]).

    Parameters:
        in_channels (`int`, *optional*, defaults to 3): channels of the input image.
        out_channels (`int`, *optional*, defaults to 3): channels of the decoded image.
        down_block_types (`tuple[str]`, *optional*, defaults to `("DownEncoderBlock2D",)`): one
            `"DownEncoderBlock2D"` per level.
        up_block_types (`tuple[str]`, *optional*, defaults to `("UpDecoderBlock2D",)`): one `"UpDecoderBlock2D"`
            per level.
        block_out_channels (`tuple[int]`, *optional*, defaults to `(64,)`): channels per level; the downsampling
            factor is `2 ** (len(block_out_channels) - 1)` (SD: `(128, 256, 512, 512)`, f8).
        layers_per_block (`int`, *optional*, defaults to 1): resnets per encoder level (the decoder has one more).
        act_fn (`str`, *optional*, defaults to `"silu"`): activation (`silu`/`swish`, `mish`, `gelu`, `relu`).
        latent_channels (`int`, *optional*, defaults to 4): channels of the latent.
        norm_num_groups (`int`, *optional*, defaults to 32): GroupNorm groups; must divide every channel count.
        sample_size (`int`, *optional*, defaults to 32): nominal image size; also the default tile size.
        scaling_factor (`float`, *optional*, defaults to 0.18215): 1 / std of the latents; diffusion models see
            `(z - shift_factor) * scaling_factor` (LDM §4.3.2, D.1).
        shift_factor (`float`, *optional*, defaults to `None`): mean of the latents, subtracted before scaling.
        latents_mean (`tuple[float]`, *optional*, defaults to `None`): per-channel latent means (SDXL-style).
        latents_std (`tuple[float]`, *optional*, defaults to `None`): per-channel latent stds (SDXL-style).
        force_upcast (`bool`, *optional*, defaults to `True`): pipelines run this VAE in float32 when they hold it
            in float16 (the SD/SDXL VAEs overflow in fp16).
        use_quant_conv (`bool`, *optional*, defaults to `True`): 1×1 conv on the encoder's moments.
        use_post_quant_conv (`bool`, *optional*, defaults to `True`): 1×1 conv on the latents before decoding.
        mid_block_add_attention (`bool`, *optional*, defaults to `True`): self-attention in the mid blocks.
        encoder_squeeze_excitation (`bool`, *optional*, defaults to `False`): channel gating after the second conv
            of every encoder down-block resnet (KLVAE only; starts as the identity).
        latent_rgb_factors (`list[list[float]]`, *optional*, defaults to `None`): a `(latent_channels + 1) × 3`
            linear map latents → RGB for fast previews (`diffusers_klvae.latent_preview.latents_to_rgb`; KLVAE only).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResnetBlock"]
    _group_offload_block_modules = ["quant_conv", "post_quant_conv", "encoder", "decoder"]  # as AutoencoderKL

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        encoder_squeeze_excitation: bool = False,
        latent_rgb_factors: list[list[float]] | None = None,
    ):
        super().__init__()
        _validate_architecture(in_channels, out_channels, down_block_types, up_block_types, block_out_channels,
                               layers_per_block, act_fn, latent_channels, norm_num_groups)
        levels = dict(block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                      groups=norm_num_groups, act_fn=act_fn, mid_block_add_attention=mid_block_add_attention)
        self.encoder = Encoder(in_channels=in_channels, latent_channels=latent_channels,
                               squeeze_excitation=encoder_squeeze_excitation, **levels)
        self.decoder = Decoder(latent_channels=latent_channels, out_channels=out_channels, **levels)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        self.use_slicing = False
        self.use_tiling = False
        size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = size  # diffusers' attribute names, so code that sets them by hand still works
        self.tile_latent_min_size = max(size // self.downsampling_factor, 1)
        self.tile_overlap_factor = 0.25
        # tiled calls (models/tiling.py): device budget in bytes (None: from the tile size), dtype of the stored maps
        # (None: scaled float16 for a float32 model, else the model's), where maps beyond the budget go ("memory"/"file")
        self.tile_max_device_bytes = None
        self.tile_storage_dtype = None
        self.tile_map_store = "memory"
        self.tile_map_dir = None

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent cell along each side: 2 ** (levels - 1) (8 for KL-f8)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ encode / decode
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → moments (B, 2·latent_channels, H/f, W/f); the only encode path."""
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled_encode(x)
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """latents (B, latent_channels, h, w) → images (B, out_channels, h·f, w·f); the only decode path."""
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._tiled_decode(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        """images → moments, streamed at bounded device memory (``tiling.tiled_encode``)."""
        from .tiling import tiled_encode

        _check_unhooked(self.encoder, "encoder")
        return tiled_encode(self, x)

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        """latents → images, streamed at bounded device memory (``tiling.tiled_decode``)."""
        from .tiling import tiled_decode

        _check_unhooked(self.decoder, "decoder")
        return tiled_decode(self, z)

    def tiled_encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        r"""Encode images with tiling whatever ``use_tiling`` says (diffusers' public method; here the untiled
        network's result at bounded device memory: see ``enable_tiling``).

        Args:
            x (`torch.Tensor`): images in [-1, 1], (B, in_channels, H, W).
            return_dict (`bool`, *optional*, defaults to `True`): return an [`AutoencoderKLOutput`] rather than a tuple.
        """
        self._check_input(x, self.config.in_channels, self.downsampling_factor, "image")
        posterior = DiagonalGaussianDistribution(self._tiled_encode(x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        r"""Decode latents with tiling whatever ``use_tiling`` says (diffusers' public method; see ``enable_tiling``).

        Args:
            z (`torch.Tensor`): unscaled latents, (B, latent_channels, h, w).
            return_dict (`bool`, *optional*, defaults to `True`): return a [`DecoderOutput`] rather than a tuple.
        """
        self._check_input(z, self.config.latent_channels, 1, "latent")
        decoded = self._tiled_decode(z)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        """Encode images in [-1, 1] of shape (B, in_channels, H, W), H and W multiples of the downsampling factor.

        Returns an [`AutoencoderKLOutput`] whose ``latent_dist`` is the posterior (or a 1-tuple if not ``return_dict``).
        """
        self._check_input(x, self.config.in_channels, self.downsampling_factor, "image")
        moments = self._map_slices(self._encode, x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None) -> DecoderOutput | tuple[torch.Tensor]:
        """Decode latents (B, latent_channels, h, w) — unscaled: pipelines pass ``latents / scaling_factor`` — to
        images in about [-1, 1]. ``generator`` is accepted for API compatibility (decoding is deterministic)."""
        self._check_input(z, self.config.latent_channels, 1, "latent")
        decoded = self._map_slices(self._decode, z)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        return_posterior: bool = False,
        latent_mask: torch.Tensor | None = None,
    ) -> KLVAEOutput | tuple:
        r"""
        Encode, take the posterior's mode (or a sample), decode.

        Args:
            sample (`torch.Tensor`): images in [-1, 1], (B, in_channels, H, W).
            sample_posterior (`bool`, *optional*, defaults to `False`): decode a posterior sample instead of the mode.
            return_dict (`bool`, *optional*, defaults to `True`): return a [`KLVAEOutput`] rather than a tuple.
            generator (`torch.Generator`, *optional*): RNG of the posterior sample.
            return_posterior (`bool`, *optional*, defaults to `False`): also return the posterior, so that training
                makes one call to the (DDP-wrapped) model and gets both the reconstruction and the KL term.
            latent_mask (`torch.Tensor`, *optional*): (B, 1, h, w) at latent resolution, 1 = keep, 0 = hole; the
                latents are multiplied by it (holes filled with 0, the prior mean) before decoding.
        """
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        if latent_mask is not None:
            z = z * latent_mask.to(z.dtype)
        decoded = self.decode(z).sample
        if not return_dict:
            return (decoded, posterior) if return_posterior else (decoded,)
        return KLVAEOutput(sample=decoded, latent_dist=posterior if return_posterior else None)

    def _map_slices(self, fn, x: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(item) for item in x.split(1)])
        return fn(x)

    def _check_input(self, x: torch.Tensor, channels: int, factor: int, what: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected the {what} as a torch.Tensor of shape (B, {channels}, H, W); got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"expected a 4-D {what} tensor (B, {channels}, H, W); got {x.ndim}-D shape {tuple(x.shape)}"
                             + (" (add a batch dimension with x[None])" if x.ndim == 3 else ""))
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point {what} tensor (float32/float16/bfloat16, images in [-1, 1]); got {x.dtype}")
        if x.shape[1] != channels:
            raise ValueError(f"expected {channels} channels in the {what} (shape (B, {channels}, H, W)); got shape {tuple(x.shape)}")
        for name, size in (("height", x.shape[2]), ("width", x.shape[3])):
            if size % factor:
                lower, upper = size // factor * factor, (size // factor + 1) * factor
                nearest = f"{lower} or {upper}" if lower else f"{upper}"
                raise ValueError(f"{what} {name} {size} is not a multiple of the downsampling factor {factor}: use {nearest}")

    # ------------------------------------------------------------------ runtime switches (diffusers' names)
    # enable_slicing / disable_slicing / disable_tiling come from AutoencoderMixin
    def enable_tiling(self, tile_sample_min_size: int | None = None, tile_overlap_factor: float | None = None, *,
                      max_device_bytes: int | None = None, storage_dtype: torch.dtype | None = None,
                      map_store: str | None = None, map_dir: str | os.PathLike | None = None) -> None:
        """Encode/decode large inputs at bounded device memory, with the untiled network's result (up to the rounding of
        the stored maps): the network runs layer by layer over whole maps held in a store, streaming bands of rows
        through the device, with exact whole-map GroupNorm statistics and no blending (``models/tiling.py``,
        ``docs/tiling.md``). The bare call works as in diffusers. Arguments left out keep their current values.

        Args:
            tile_sample_min_size (`int`, *optional*): tile size in pixels (default: the config's ``sample_size``);
                inputs no larger than this take the untiled path, and it sets the default budget.
            tile_overlap_factor (`float`, *optional*): kept for diffusers compatibility; nothing is blended, so this
                value is not used.
            max_device_bytes (`int`, *optional*): device bytes that the maps held on the device and the bands being
                computed may take (default `None`: ``tiling.DEVICE_TILES`` = 4 times the bytes of the largest map of one
                tile, about what diffusers' tiled decode holds). Maps beyond it live in host memory (or a file). The
                weights, the input, the returned output and the mid-block attention's keys and values (two
                latent-sized maps) come on top.
            storage_dtype (`torch.dtype`, *optional*): dtype of the stored maps (default `None`: for a float32 model
                float16 with a power-of-two scale per row and channel, no overflow; else the model's dtype).
                ``torch.float32`` stores a float32 model's maps exactly, ``torch.bfloat16`` unscaled.
            map_store (`str`, *optional*): where maps beyond the budget live: ``"memory"`` (default; host memory,
                pinned for CUDA) or ``"file"`` (memory-mapped temporary files: bounds RAM for CPU users).
            map_dir (`str` or `os.PathLike`, *optional*): directory of the ``"file"`` maps (default: the system's
                temporary directory).
        """
        if tile_sample_min_size is not None:
            self.tile_sample_min_size = int(tile_sample_min_size)
            self.tile_latent_min_size = max(self.tile_sample_min_size // self.downsampling_factor, 1)
        if tile_overlap_factor is not None:
            if not 0 <= tile_overlap_factor < 1:
                raise ValueError(f"tile_overlap_factor must be in [0, 1); got {tile_overlap_factor}")
            self.tile_overlap_factor = float(tile_overlap_factor)
        if max_device_bytes is not None:
            if max_device_bytes <= 0:
                raise ValueError(f"max_device_bytes must be a positive number of bytes; got {max_device_bytes}")
            self.tile_max_device_bytes = int(max_device_bytes)
        if storage_dtype is not None:
            if not (isinstance(storage_dtype, torch.dtype) and storage_dtype.is_floating_point):
                raise ValueError(f"storage_dtype must be a floating-point torch.dtype; got {storage_dtype!r}")
            self.tile_storage_dtype = storage_dtype
        if map_store is not None:
            if map_store not in ("memory", "file"):
                raise ValueError(f"map_store must be 'memory' or 'file'; got {map_store!r}")
            self.tile_map_store = map_store
        if map_dir is not None:
            if not os.path.isdir(map_dir):
                raise ValueError(f"map_dir must be an existing directory; got {os.fspath(map_dir)!r}")
            self.tile_map_dir = os.fspath(map_dir)
        self.use_tiling = True

    # ------------------------------------------------------------------ attention processors (AutoencoderKL's API)
    def set_default_attn_processor(self) -> None:
        """Disable custom attention processors and use diffusers' plain ``AttnProcessor`` (as AutoencoderKL does)."""
        processors = self.attn_processors.values()
        if all(proc.__class__ in ADDED_KV_ATTENTION_PROCESSORS for proc in processors):
            processor = AttnAddedKVProcessor()
        elif all(proc.__class__ in CROSS_ATTENTION_PROCESSORS for proc in processors):
            processor = AttnProcessor()
        else:
            raise ValueError(f"set_default_attn_processor expects diffusers' attention processors; got {next(iter(processors))}")
        self.set_attn_processor(processor)

    def fuse_qkv_projections(self) -> None:
        """Fuse the query, key and value projections of every attention into one ``to_qkv`` and use
        ``FusedAttnProcessor2_0``; ``unfuse_qkv_projections`` undoes both (experimental in diffusers too)."""
        self.original_attn_processors = self.attn_processors
        super().fuse_qkv_projections()
        self.set_attn_processor(FusedAttnProcessor2_0())

    def unfuse_qkv_projections(self) -> None:
        """Back to the processors in use before ``fuse_qkv_projections``, without the fused ``to_qkv`` weights."""
        if getattr(self, "original_attn_processors", None) is not None:
            self.set_attn_processor(dict(self.original_attn_processors))
            self.original_attn_processors = None
        super().unfuse_qkv_projections()

    # ------------------------------------------------------------------ presets and files
    @classmethod
    def preset_config(cls, name: str) -> dict:
        """Preset name → ``KLVAE`` keyword arguments (see ``list_presets()``)."""
        return preset_config(name)

    @staticmethod
    def list_presets() -> list[str]:
        return list_presets()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "KLVAE":
        """A freshly initialised model of a named preset, e.g. ``KLVAE.from_preset("sd-kl-f8")``."""
        return cls(**{**preset_config(name), **overrides})

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        config: dict | str | os.PathLike | None = None,
        *,
        subfolder: str | None = None,
        original_config: dict | str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        force_download: bool = False,
        proxies: dict | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
        config_revision: str | None = None,
        disable_mmap: bool = False,
        low_cpu_mem_usage: bool | None = None,
        **kwargs,
    ) -> "KLVAE":
        r"""
        Load an original LDM/CompVis VAE checkpoint (keys with ``first_stage_model.``, ``vae.`` or no prefix; diffusers
        keys work too), with the arguments of diffusers' ``AutoencoderKL.from_single_file``, and return the same model
        (``eval()`` mode).

        Args:
            pretrained_model_link_or_path_or_dict (`str`, `os.PathLike` or `dict`): a local ``.safetensors``/``.ckpt``
                file, a Hub file URL (``https://huggingface.co/<repo>/blob/main/<file>``), or a state dict.
            config (`str`, `os.PathLike` or `dict`, *optional*, defaults to `None`): a Hub repo id or local diffusers
                folder (with ``subfolder``), a ``config.json`` path, a preset name or a config dict. `None`: the
                ``"sd-kl-f8"`` preset (diffusers instead fetches the config of the model it infers from the keys,
                which for a VAE-only file is the same SD 1.x config).
            subfolder (`str`, *optional*, defaults to `None`): where ``config.json`` sits in the repo or folder.
            original_config (`str` or `dict`, *optional*, defaults to `None`): an LDM YAML (path, URL or dict) to build
                the config from, as in diffusers; excludes ``config``.
            torch_dtype (`torch.dtype`, *optional*, defaults to `None`): dtype of the returned model (``dtype=`` too).
            device (`str` or `torch.device`, *optional*, defaults to `None`): device of the returned model.
            force_download, proxies, token, cache_dir, local_files_only, revision, config_revision, disable_mmap:
                Hub download options, as in diffusers (``revision`` is the checkpoint's, ``config_revision`` the
                config's).
            low_cpu_mem_usage (`bool`, *optional*): accepted for diffusers compatibility; the checkpoint is loaded
                into an initialised model either way.
            kwargs: config overrides (e.g. ``scaling_factor=0.13025``); ``dtype`` is an alias of ``torch_dtype``.
        """
        from .single_file import checkpoint_state_dict, load_single_file_into

        torch_dtype = kwargs.pop("dtype", None) or torch_dtype
        unknown = sorted(set(kwargs) - set(inspect.signature(cls.__init__).parameters))
        if unknown:
            raise TypeError(f"from_single_file got unexpected arguments {unknown}; config overrides must be KLVAE "
                            "config keys")
        if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
            raise TypeError(f"torch_dtype must be a torch.dtype, e.g. torch.float16; got {torch_dtype!r}")
        hub = dict(force_download=force_download, proxies=proxies, token=token, cache_dir=cache_dir,
                   local_files_only=local_files_only)
        state = checkpoint_state_dict(pretrained_model_link_or_path_or_dict, revision=revision,
                                      disable_mmap=disable_mmap, **hub)
        if original_config is not None:
            if config is not None:
                raise ValueError("pass either config= or original_config=, not both")
            config_dict = _config_from_original(original_config, state, local_files_only=local_files_only)
        else:
            config_dict = _resolve_config(config, subfolder=subfolder, revision=config_revision, **hub)
        model = cls.from_config({**config_dict, **kwargs})
        load_single_file_into(model, state, source=_describe(pretrained_model_link_or_path_or_dict))
        return model.to(device=device, dtype=torch_dtype).eval()

    def save_single_file(self, path: str | os.PathLike, force: bool = False) -> None:
        """Write the original LDM layout (no prefix, 1×1-conv attention, ``.safetensors``) for ComfyUI / A1111.

        Those loaders ignore any config and build the SD KL-f8 architecture (ComfyUI also its 16-channel variant
        without quant convs), so a file of another architecture would fail to load or, worse, load and decode wrong.
        The SD/SDXL architecture is therefore required (``single_file_mismatches`` lists what differs).

        Args:
            path (`str` or `os.PathLike`): the ``.safetensors`` file to write.
            force (`bool`, *optional*, defaults to `False`): write any architecture, for tools that read a config
                beside the file (``KLVAE.from_single_file(path, config=...)`` does).
        """
        from .single_file import save_single_file, single_file_mismatches

        mismatches = single_file_mismatches(self.config)
        if mismatches and not force:
            differing = ", ".join(f"{key}={value!r} (needs {want!r})" for key, (value, want) in mismatches.items())
            raise ValueError(f"ComfyUI/A1111 load single files as the SD KL-f8 architecture, and this config differs: "
                             f"{differing}; use save_pretrained, or force=True for tools that read its config")
        save_single_file(self, path)

    def to_json_string(self) -> str:
        # A default-architecture KLVAE saves as a plain AutoencoderKL folder: tools that know only diffusers read it.
        config = json.loads(super().to_json_string())
        if all(config.get(key) == default for key, default in EXTRA_CONFIG_DEFAULTS.items()):
            config = {k: v for k, v in config.items() if k not in EXTRA_CONFIG_DEFAULTS}
            config["_class_name"] = "AutoencoderKL"
        elif config.get("encoder_squeeze_excitation"):
            config["down_block_types"] = [SE_DOWN_BLOCK_TYPE] * len(config["down_block_types"])
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs):
        config_dict = dict(config_dict)
        if SE_DOWN_BLOCK_TYPE in (config_dict.get("down_block_types") or ()):
            config_dict["down_block_types"] = [DOWN_BLOCK_TYPES[0]] * len(config_dict["down_block_types"])
            config_dict["encoder_squeeze_excitation"] = True
        return super().extract_init_dict(config_dict, **kwargs)


def _check_unhooked(part: nn.Module, name: str) -> None:
    # Tiling calls the layers of the encoder/decoder one by one, never its forward: a hook there (block-level group
    # offloading loads the weights of conv_in, the mid block and conv_out in it) would not run.
    if _hooked(part):
        raise ValueError(f"tiling runs the {name} layer by layer, past the hook on its forward (block-level group "
                         "offloading); use enable_group_offload(..., offload_type='leaf_level') with tiling")


def _resolve_config(config: dict | str | os.PathLike | None, *, subfolder: str | None = None, **hub) -> dict[str, Any]:
    """``from_single_file``'s ``config``: None (the SD preset), a dict, a preset name, a local folder or config.json,
    or a Hub repo id (``subfolder`` and Hub options as in ``ConfigMixin.load_config``) → a config dict."""
    if config is None:
        return preset_config("sd-kl-f8")
    if isinstance(config, dict):
        return dict(config)
    if str(config) in list_presets():
        return preset_config(str(config))
    path = os.fspath(config)
    if os.path.isfile(path):  # a config.json itself
        path, subfolder = os.path.dirname(path) or ".", None
    try:
        return dict(KLVAE.load_config(path, subfolder=subfolder, **hub))
    except (OSError, ValueError) as err:
        raise ValueError(f"config {config!r} is neither a dict, a preset ({', '.join(list_presets())}), a diffusers "
                         f"folder nor a Hub repo with a config.json{f' in {subfolder!r}' if subfolder else ''}: {err}") from err


def _config_from_original(original_config: dict | str, state: dict[str, torch.Tensor], *,
                          local_files_only: bool | None) -> dict[str, Any]:
    """An LDM YAML (dict, path or URL) → a diffusers config, with diffusers' own conversion."""
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm, fetch_original_config

    if isinstance(original_config, str):
        original_config = fetch_original_config(original_config, local_files_only=bool(local_files_only))
    return create_vae_diffusers_config_from_ldm(original_config, state)


def _describe(source) -> str:
    return "the state dict" if isinstance(source, dict) else repr(os.fspath(source))


def _validate_architecture(in_channels, out_channels, down_block_types, up_block_types, block_out_channels,
                           layers_per_block, act_fn, latent_channels, norm_num_groups) -> None:
    """Raise a ValueError naming the wrong value and what is allowed."""
    levels = len(block_out_channels)
    if levels == 0:
        raise ValueError("block_out_channels must list at least one level, e.g. (128, 256, 512, 512)")
    for name, types, allowed in (("down_block_types", down_block_types, DOWN_BLOCK_TYPES), ("up_block_types", up_block_types, UP_BLOCK_TYPES)):
        bad = [t for t in types if t not in allowed]
        if bad:
            raise ValueError(f"{name} has unknown block type {bad[0]!r}; allowed: {list(allowed)}")
        if len(types) != levels:
            raise ValueError(f"{name} has {len(types)} entries but block_out_channels has {levels}: give one per level")
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("latent_channels", latent_channels),
                        ("layers_per_block", layers_per_block), ("norm_num_groups", norm_num_groups)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    for channels in block_out_channels:
        if channels % norm_num_groups:
            raise ValueError(f"block_out_channels entry {channels} is not divisible by norm_num_groups={norm_num_groups}; "
                             f"use channel counts that are multiples of {norm_num_groups} or a divisor of {channels} as norm_num_groups")
    if act_fn not in ACTIVATIONS:
        raise ValueError(f"act_fn={act_fn!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
