"""KLVAE: the KL-regularized autoencoder of latent diffusion (Rombach et al. 2022), in one class.

To a pipeline or a checkpoint it is diffusers' ``AutoencoderKL`` (``models/autoencoders/autoencoder_kl.py``); its
extras (presets, encoder squeeze-and-excitation, seam-free tiling, LDM single files, a latent preview) are opt-in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

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

from . import tiling
from .config import config_for_disk, config_from_disk, downsampling_factor_of, validate_architecture
from .encoder_decoder import Decoder, Encoder
from .posterior import DiagonalGaussianDistribution
from .presets import list_presets, preset_config
from .single_file_model import SingleFileMixin


@dataclass
class KLVAEOutput(DecoderOutput):
    """Output of ``KLVAE.forward``.

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`): the reconstruction.
        latent_dist (`DiagonalGaussianDistribution`, *optional*): the posterior, when ``return_posterior=True``.
    """

    latent_dist: DiagonalGaussianDistribution | None = None


class KLVAE(ModelMixin, AttentionMixin, AutoencoderMixin, ConfigMixin, PeftAdapterMixin, SingleFileMixin):
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
        validate_architecture(in_channels, out_channels, down_block_types, up_block_types, block_out_channels,
                              layers_per_block, latent_channels, norm_num_groups)
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
        self._default_tiling_options()

    def _default_tiling_options(self) -> None:
        # tiled calls (models/tiling.py): device budget in bytes (None: from the tile size), dtype of the stored maps
        # (None: scaled float16 for a float32 model, else the model's), where maps beyond the budget go ("memory"/"file")
        self.tile_max_device_bytes = None
        self.tile_storage_dtype = None
        self.tile_map_store = "memory"
        self.tile_map_dir = None

    def disable_tiling(self) -> None:
        """Back to the untiled path. The options of :meth:`enable_tiling` (``max_device_bytes``, ``storage_dtype``,
        ``map_store``, ``map_dir``) return to their defaults; the tile size stays, as in diffusers."""
        self.use_tiling = False
        self._default_tiling_options()

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent cell along each side: 2 ** (levels - 1) (8 for KL-f8)."""
        return downsampling_factor_of(self.config)

    # ------------------------------------------------------------------ encode / decode
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → moments (B, 2·latent_channels, H/f, W/f); the only encode path."""
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return tiling.tiled_encode(self, x)
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """latents (B, latent_channels, h, w) → images (B, out_channels, h·f, w·f); the only decode path."""
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return tiling.tiled_decode(self, z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def tiled_encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        r"""Encode images with tiling whatever ``use_tiling`` says (diffusers' public method; here the untiled
        network's result at bounded device memory: see ``enable_tiling``).

        Args:
            x (`torch.Tensor`): images in [-1, 1], (B, in_channels, H, W).
            return_dict (`bool`, *optional*, defaults to `True`): return an [`AutoencoderKLOutput`] rather than a tuple.
        """
        self._check_input(x, self.config.in_channels, self.downsampling_factor, "image")
        posterior = DiagonalGaussianDistribution(tiling.tiled_encode(self, x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        r"""Decode latents with tiling whatever ``use_tiling`` says (diffusers' public method; see ``enable_tiling``).

        Args:
            z (`torch.Tensor`): unscaled latents, (B, latent_channels, h, w).
            return_dict (`bool`, *optional*, defaults to `True`): return a [`DecoderOutput`] rather than a tuple.
        """
        self._check_input(z, self.config.latent_channels, 1, "latent")
        decoded = tiling.tiled_decode(self, z)
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
        if not x.numel():
            raise ValueError(f"the {what} tensor is empty: shape {tuple(x.shape)}")
        for name, size in (("height", x.shape[2]), ("width", x.shape[3])):
            if size % factor:
                lower, upper = size // factor * factor, (size // factor + 1) * factor
                nearest = f"{lower} or {upper}" if lower else f"{upper}"
                raise ValueError(f"{what} {name} {size} is not a multiple of the downsampling factor {factor}: use {nearest}")

    # ------------------------------------------------------------------ runtime switches (diffusers' names)
    # enable_slicing / disable_slicing come from AutoencoderMixin
    def enable_tiling(self, tile_sample_min_size: int | None = None, tile_overlap_factor: float | None = None, *,
                      max_device_bytes: int | None = None, storage_dtype: torch.dtype | None = None,
                      map_store: str | None = None, map_dir: str | os.PathLike | None = None) -> None:
        """Encode/decode large inputs at bounded device memory, with the untiled network's result up to the rounding of
        the stored maps: exact whole-map GroupNorm statistics, no blending (``docs/tiling.md``). The bare call works as
        in diffusers. Arguments left out keep their current values until :meth:`disable_tiling` restores the defaults.

        Args:
            tile_sample_min_size (`int`, *optional*): tile size in pixels (default: the config's ``sample_size``);
                inputs no larger than this take the untiled path, and it sets the default budget.
            tile_overlap_factor (`float`, *optional*): kept for diffusers compatibility; nothing is blended, so this
                value is not used.
            max_device_bytes (`int`, *optional*): device bytes that the maps held on the device and the bands being
                computed may take (default `None`: ``tiling.DEVICE_TILES`` = 4 times the bytes of the largest map of one
                tile). Maps beyond it live in host memory (or a file). The weights, the input, the output and the
                attention's keys and values come on top.
            storage_dtype (`torch.dtype`, *optional*): dtype of the stored maps (default `None`: for a float32 model
                float16 centred and scaled per row and channel, no overflow; else the model's dtype). ``torch.float32``
                stores a float32 model's maps exactly.
            map_store (`str`, *optional*): where maps beyond the budget live: ``"memory"`` (default; host memory,
                pinned for CUDA) or ``"file"`` (an unlinked temporary file: bounds RAM for CPU users).
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

    # ------------------------------------------------------------------ presets and files (single files: SingleFileMixin)
    preset_config = staticmethod(preset_config)
    list_presets = staticmethod(list_presets)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "KLVAE":
        """A freshly initialised model of a named preset, e.g. ``KLVAE.from_preset("sd-kl-f8")``."""
        return cls(**{**preset_config(name), **overrides})

    def to_json_string(self) -> str:
        # A default-architecture KLVAE saves as a plain AutoencoderKL folder: tools that know only diffusers read it.
        config = config_for_disk(json.loads(super().to_json_string()))
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs):
        return super().extract_init_dict(config_from_disk(config_dict), **kwargs)

