"""Building blocks of the KL-f8 autoencoder: residual blocks, down/up sampling, mid-block attention.

Every module and attribute name mirrors diffusers' ``Encoder``/``Decoder`` (``down_blocks.0.resnets.0.norm1``,
``mid_block.attentions.0.to_q``, ``upsamplers.0.conv`` ...), so a state dict moves between ``KLVAE`` and
``AutoencoderKL`` with no key mapping. References: LDM (Rombach et al. 2022, ``ldm/modules/diffusionmodules/model.py``),
diffusers ``models/autoencoders/vae.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6  # GroupNorm eps of the LDM autoencoder (not torch's 1e-5): weights were trained with it
SE_REDUCTION = 16  # squeeze-and-excitation bottleneck: channels // 16 (a few thousand parameters in all)
ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def conv3(c_in: int, c_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kw)


def normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"act_fn={name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def norm_act(norm: nn.GroupNorm, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm then activation; in inference the activation runs in place on the norm's fresh output."""
    h = norm(x)
    if not torch.is_grad_enabled() and isinstance(act, nn.SiLU):
        return F.silu(h, inplace=True)  # saves one full-size temporary per block, same values
    return act(h)


class SqueezeExcitation(nn.Module):
    """Channel gating ``h * 2·sigmoid(fc2(act(fc1(mean_hw(h)))))``; fc2 starts at zero, so the gate starts at exactly 1
    and a model loaded from plain KL-f8 weights gives the same outputs until it is fine-tuned."""

    def __init__(self, *, channels: int, act_fn: str = "silu"):
        super().__init__()
        hidden = max(channels // SE_REDUCTION, 4)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = activation(act_fn)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(h.mean(dim=(2, 3), keepdim=True))))  # (B, C, 1, 1)
        return h * (2.0 * torch.sigmoid(gate))


class ResnetBlock(nn.Module):
    """GroupNorm → act → conv3 → GroupNorm → act → conv3 (+ optional SE), plus a 1×1 shortcut when channels change."""

    def __init__(self, *, in_channels: int, out_channels: int, groups: int, act_fn: str = "silu", squeeze_excitation: bool = False):
        super().__init__()
        self.norm1 = normalize(in_channels, groups)
        self.conv1 = conv3(in_channels, out_channels)
        self.norm2 = normalize(out_channels, groups)
        self.dropout = nn.Dropout(0.0)  # kept for key/structure parity with diffusers; the LDM VAE trains without dropout
        self.conv2 = conv3(out_channels, out_channels)
        self.nonlinearity = activation(act_fn)
        self.squeeze_excitation = SqueezeExcitation(channels=out_channels, act_fn=act_fn) if squeeze_excitation else None
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_act(self.norm1, self.nonlinearity, x))
        h = self.conv2(self.dropout(norm_act(self.norm2, self.nonlinearity, h)))
        if self.squeeze_excitation is not None:
            h = self.squeeze_excitation(h)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        if not torch.is_grad_enabled():
            return h.add_(shortcut)  # h is our own temporary: reuse its memory
        return shortcut + h


class Downsample(nn.Module):
    """Stride-2 3×3 conv with LDM's asymmetric padding."""

    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch conv has no asymmetric padding: pad (left 0, right 1, top 0, bottom 1), then conv with padding=0
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest ×2 upsampling, then a 3×3 conv."""

    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:
            x = x.float()  # nearest upsampling of bf16 is not implemented on every backend
        x = F.interpolate(x, scale_factor=2.0, mode="nearest").to(dtype)  # (B, C, 2H, 2W)
        return self.conv(x)


class SelfAttention(nn.Module):
    """Single-head spatial self-attention with a residual connection (the LDM mid-block ``AttnBlock``).

    Linear ``to_q/to_k/to_v/to_out.0`` layers as in diffusers; LDM files store them as 1×1 convs (``q/k/v/proj_out``)."""

    def __init__(self, *, channels: int, groups: int):
        super().__init__()
        self.group_norm = normalize(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C); memory-efficient kernels where available
        out = self.to_out[1](self.to_out[0](out))
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class MidBlock(nn.Module):
    """resnet → (self-attention) → resnet at the lowest resolution."""

    def __init__(self, *, channels: int, groups: int, act_fn: str, add_attention: bool = True):
        super().__init__()
        block = dict(in_channels=channels, out_channels=channels, groups=groups, act_fn=act_fn)
        self.resnets = nn.ModuleList([ResnetBlock(**block), ResnetBlock(**block)])
        self.attentions = nn.ModuleList([SelfAttention(channels=channels, groups=groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """``num_layers`` resnets, then a stride-2 downsample unless this is the last level."""

    def __init__(self, *, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, add_downsample: bool, squeeze_excitation: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels, groups=groups, act_fn=act_fn, squeeze_excitation=squeeze_excitation)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(channels=out_channels)] if add_downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpBlock(nn.Module):
    """``num_layers`` resnets, then nearest ×2 upsampling + conv unless this is the last level."""

    def __init__(self, *, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels, groups=groups, act_fn=act_fn)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(channels=out_channels)] if add_upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class _CheckpointedStages(nn.Module):
    """Runs a stage through diffusers' gradient-checkpointing function when ``enable_gradient_checkpointing`` set it."""

    gradient_checkpointing = False

    def _run(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(stage, x)
        return stage(x)


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
        self.mid_block = MidBlock(channels=block_out_channels[-1], groups=groups, act_fn=act_fn, add_attention=mid_block_add_attention)
        self.conv_norm_out = normalize(block_out_channels[-1], groups)
        self.conv_act = activation(act_fn)
        self.conv_out = conv3(block_out_channels[-1], 2 * latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = self._run(block, x)
        x = self._run(self.mid_block, x)
        return self.conv_out(norm_act(self.conv_norm_out, self.conv_act, x))


class Decoder(_CheckpointedStages):
    """latents (B, latent_channels, h, w) → image (B, out_channels, h·f, w·f); levels mirror the encoder's, one resnet more each."""

    def __init__(self, *, latent_channels: int, out_channels: int, block_out_channels: tuple[int, ...], layers_per_block: int,
                 groups: int, act_fn: str, mid_block_add_attention: bool):
        super().__init__()
        channels = list(reversed(block_out_channels))
        self.conv_in = conv3(latent_channels, channels[0])
        self.mid_block = MidBlock(channels=channels[0], groups=groups, act_fn=act_fn, add_attention=mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(in_channels=channels[max(i - 1, 0)], out_channels=c, num_layers=layers_per_block + 1, groups=groups,
                    act_fn=act_fn, add_upsample=i != len(channels) - 1)
            for i, c in enumerate(channels)
        )
        self.conv_norm_out = normalize(channels[-1], groups)
        self.conv_act = activation(act_fn)
        self.conv_out = conv3(channels[-1], out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self._run(self.mid_block, x)
        x = x.to(self.up_blocks[0].resnets[0].conv1.weight.dtype)  # pipelines may keep only the mid block in fp32
        for block in self.up_blocks:
            x = self._run(block, x)
        return self.conv_out(norm_act(self.conv_norm_out, self.conv_act, x))
