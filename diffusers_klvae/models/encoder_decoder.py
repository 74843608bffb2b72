"""The Encoder and the Decoder: the layers of ``blocks.py`` assembled into levels, the mid block and its attention.

Module names and registration order are diffusers' (``Encoder.down_blocks``, ``Decoder.up_blocks`` before
``mid_block``, ``mid_block.attentions`` before ``resnets``), so ``state_dict()`` keys and order match ``AutoencoderKL``.
In inference the levels run layer by layer (``_stages``), so a block's input is not held for the whole block.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from .blocks import Downsample, ResnetBlock, Upsample, conv3, norm_act_conv, normalize, upscale_dtype


class _CheckpointedStages(nn.Module):
    """Runs a stage through diffusers' gradient-checkpointing function when ``enable_gradient_checkpointing`` set it."""

    gradient_checkpointing = False

    def _run(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(stage, x)
        return stage(x)

    @staticmethod
    def _stages(blocks: nn.ModuleList) -> list[nn.Module]:
        """The blocks (with grad), or in inference their layers one by one: ``x = block(x)`` would hold the block's
        input for the whole block. A hooked block (group offloading, accelerate) runs whole: its hook loads weights."""
        if torch.is_grad_enabled():
            return list(blocks)
        return [layer for block in blocks for layer in ([block] if is_hooked(block) else block.layers())]


def is_hooked(module: nn.Module) -> bool:
    """Whether diffusers' hooks (``HookRegistry``: group offloading, layerwise casting) or accelerate's
    (``add_hook_to_module``: cpu offload) wrap the module's forward."""
    return getattr(module, "_diffusers_hook", None) is not None or getattr(module, "_hf_hook", None) is not None


class SelfAttention(nn.Module, AttentionModuleMixin):
    """Single-head spatial self-attention with a residual connection (the LDM mid-block ``AttnBlock``).

    Linear ``to_q/to_k/to_v/to_out.0`` layers as in diffusers; LDM files store them as 1×1 convs (``q/k/v/proj_out``).
    The computation is done by an attention processor, diffusers' protocol: ``processor(attn, hidden_states)``. The
    default is diffusers' ``AttnProcessor2_0`` (what ``AutoencoderKL`` uses), and the attributes below are the ones
    diffusers' processors read from an ``Attention`` module, at the values of AutoencoderKL's mid-block attention, so
    that ``set_attn_processor(AttnProcessor())``, ``FusedAttnProcessor2_0`` (after ``fuse_projections``) or a custom
    processor behave as they do on AutoencoderKL.
    """

    _default_processor_cls = AttnProcessor2_0
    _available_processors = [AttnProcessor2_0]

    def __init__(self, *, channels: int, groups: int):
        super().__init__()
        self.group_norm = normalize(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        # diffusers' Attention(channels, heads=1, dim_head=channels, residual_connection=True, upcast_softmax=True)
        self.heads, self.scale, self.rescale_output_factor = 1, channels**-0.5, 1.0
        self.residual_connection, self.use_bias, self.is_cross_attention = True, True, False
        self.upcast_attention, self.upcast_softmax, self.only_cross_attention = False, True, False
        self.spatial_norm = self.norm_cross = self.norm_q = self.norm_k = None
        self.set_processor(AttnProcessor2_0())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.processor(self, x)


class UNetMidBlock2D(_CheckpointedStages):
    """resnet → (self-attention) → resnet at the lowest resolution. Named as diffusers' block so that code that
    looks for it by class name (``test_gradient_checkpointing_is_applied``) finds it; with gradient checkpointing,
    the second resnet is checkpointed, as there."""

    def __init__(self, *, channels: int, groups: int, act_fn: str, add_attention: bool = True):
        super().__init__()
        block = dict(in_channels=channels, out_channels=channels, groups=groups, act_fn=act_fn)
        # registration order as diffusers' UNetMidBlock2D (attentions first): same state_dict()/named_parameters() order
        self.attentions = nn.ModuleList([SelfAttention(channels=channels, groups=groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(**block), ResnetBlock(**block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self._run(self.resnets[1], x)


class _Level(nn.Module):
    """One resolution level: ``num_layers`` resnets (the first changes the channels), then its resampler unless this is
    the last level. ``layers()`` is the run order, which ``_stages`` and tiling use to run the layers one by one."""

    def __init__(self, *, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 squeeze_excitation: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels, groups=groups,
                        act_fn=act_fn, squeeze_excitation=squeeze_excitation)
            for i in range(num_layers)
        )

    def layers(self) -> list[nn.Module]:
        """The resnets, then the resampler: the module lists in registration order."""
        return [layer for stage in self.children() for layer in stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers():
            x = layer(x)
        return x


class DownBlock(_Level):
    """Resnets, then a stride-2 downsample unless this is the last level."""

    def __init__(self, *, out_channels: int, add_downsample: bool, **level):
        super().__init__(out_channels=out_channels, **level)
        self.downsamplers = nn.ModuleList([Downsample(channels=out_channels)] if add_downsample else [])


class UpBlock(_Level):
    """Resnets, then nearest ×2 upsampling + conv unless this is the last level."""

    def __init__(self, *, out_channels: int, add_upsample: bool, **level):
        super().__init__(out_channels=out_channels, **level)
        self.upsamplers = nn.ModuleList([Upsample(channels=out_channels)] if add_upsample else [])


class Encoder(_CheckpointedStages):
    """image (B, in_channels, H, W) → moments (B, 2·latent_channels, H/f, W/f) with f = 2**(levels - 1)."""

    def __init__(self, *, in_channels: int, latent_channels: int, block_out_channels: tuple[int, ...], layers_per_block: int,
                 groups: int, act_fn: str, mid_block_add_attention: bool, squeeze_excitation: bool = False):
        super().__init__()
        self.conv_in = conv3(in_channels, block_out_channels[0])
        last = len(block_out_channels) - 1
        self.down_blocks = nn.ModuleList(
            DownBlock(in_channels=block_out_channels[max(i - 1, 0)], out_channels=channels, num_layers=layers_per_block,
                      groups=groups, act_fn=act_fn, add_downsample=i != last, squeeze_excitation=squeeze_excitation)
            for i, channels in enumerate(block_out_channels)
        )
        self.mid_block = UNetMidBlock2D(channels=block_out_channels[-1], groups=groups, act_fn=act_fn, add_attention=mid_block_add_attention)
        self.conv_norm_out = normalize(block_out_channels[-1], groups)
        self.conv_act = nn.SiLU()  # diffusers uses SiLU here whatever act_fn is
        self.conv_out = conv3(block_out_channels[-1], 2 * latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self._stages(self.down_blocks):
            x = self._run(stage, x)
        x = self._run(self.mid_block, x)
        return norm_act_conv(self.conv_norm_out, self.conv_act, self.conv_out, x)


class Decoder(_CheckpointedStages):
    """latents (B, latent_channels, h, w) → image (B, out_channels, h·f, w·f); levels mirror the encoder's, one resnet more each."""

    def __init__(self, *, latent_channels: int, out_channels: int, block_out_channels: tuple[int, ...], layers_per_block: int,
                 groups: int, act_fn: str, mid_block_add_attention: bool):
        super().__init__()
        channels = list(reversed(block_out_channels))
        self.conv_in = conv3(latent_channels, channels[0])
        self.up_blocks = nn.ModuleList(  # registered before mid_block, as in diffusers' Decoder
            UpBlock(in_channels=channels[max(i - 1, 0)], out_channels=c, num_layers=layers_per_block + 1, groups=groups,
                    act_fn=act_fn, add_upsample=i != len(channels) - 1)
            for i, c in enumerate(channels)
        )
        self.mid_block = UNetMidBlock2D(channels=channels[0], groups=groups, act_fn=act_fn, add_attention=mid_block_add_attention)
        self.conv_norm_out = normalize(channels[-1], groups)
        self.conv_act = nn.SiLU()  # diffusers uses SiLU here whatever act_fn is
        self.conv_out = conv3(channels[-1], out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self._run(self.mid_block, x)
        x = x.to(upscale_dtype(self))  # pipelines may keep only the mid block in fp16 (upcast_vae)
        for stage in self._stages(self.up_blocks):
            x = self._run(stage, x)
        return norm_act_conv(self.conv_norm_out, self.conv_act, self.conv_out, x)
