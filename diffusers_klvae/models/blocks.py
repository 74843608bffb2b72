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


# Inference on maps larger than this (128 MB in float32: 1024² decodes and up) runs the convolutions in bands of rows of
# about this many elements, so that the normalized/activated copy of a map never exists whole and the second conv of
# a residual block writes over its input: it lowers the peak memory of a 1024² decode by about half, and conv results
# are the same up to float rounding. Smaller maps take the plain path: banding costs ~8% time (measured at 512², where
# the memory is not the problem).
# Maps *stored* in a narrower dtype than the weights (tiling holds whole maps in bfloat16) always run in bands: each
# band is computed in the weights' dtype and its result stored back in the map's dtype.
BAND_ELEMENTS = 2**25


def conv3(c_in: int, c_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kw)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and keys) whose statistics can come from outside.

    ``stats_hook`` is ``None`` except inside ``diffusers_klvae.models.tiling``, which sets it for the duration of a
    tiled call to a callable ``(module, x) -> (mean, var)``, each ``(B, groups)`` float32: tiles then normalize with
    statistics of the whole image instead of their own.
    """

    stats_hook = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats_hook is None:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        scale, shift = self.scale_shift(x)
        return torch.addcmul(shift, x, scale)

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (mean, biased var) of x, each (B, groups) float32, from per-channel moments (no copy of x)."""
        var_c, mean_c = channel_var_mean(x)  # (B, C)
        b = x.shape[0]
        mean_c, var_c = mean_c.view(b, self.num_groups, -1), var_c.view(b, self.num_groups, -1)
        mean = mean_c.mean(-1)  # every channel of a group has the same number of pixels
        var = (var_c + (mean_c - mean[..., None]).square()).mean(-1)
        return mean, var

    def scale_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift), each (B, C, 1, 1) in the weights' dtype, with ``norm(x) == x * scale + shift``."""
        mean, var = self.statistics(x) if self.stats_hook is None else self.stats_hook(self, x)
        per_group = x.shape[1] // self.num_groups
        rstd = torch.rsqrt(var + self.eps).repeat_interleave(per_group, dim=1)  # (B, C)
        mean = mean.repeat_interleave(per_group, dim=1)
        scale = rstd if self.weight is None else rstd * self.weight.float()
        shift = -mean * scale if self.bias is None else self.bias.float() - mean * scale
        dtype = x.dtype if self.weight is None else self.weight.dtype
        return scale[..., None, None].to(dtype), shift[..., None, None].to(dtype)


def merge_moments(a: tuple, b: tuple) -> tuple:
    """Chan et al.'s pairwise merge of (count, mean, M2) moments: stable for any number of parts."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta.square() * (n_a * n_b / n)


def channel_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (biased var, mean) of x (B, C, H, W), each (B, C) float32; maps not in float32 are read in bands of
    rows (float64 merge), so no float32 copy of a whole map is made."""
    if x.dtype == torch.float32:
        return torch.var_mean(x, dim=(2, 3), correction=0)
    moments = None
    rows = _band_rows(x)
    for r0 in range(0, x.shape[2], rows):
        band = x[:, :, r0: r0 + rows].float()
        var, mean = torch.var_mean(band, dim=(2, 3), correction=0)
        count = band.shape[2] * band.shape[3]
        part = (count, mean.double(), var.double() * count)
        moments = part if moments is None else merge_moments(moments, part)
    n, mean, m2 = moments
    return (m2 / n).float(), mean.float()


def normalize(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(groups, channels, eps=NORM_EPS)


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"act_fn={name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _act_(act: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """act(h), in place on h (our own temporary) when grad is off and the activation allows it."""
    if not torch.is_grad_enabled() and isinstance(act, nn.SiLU):
        return F.silu(h, inplace=True)  # saves one full-size temporary per block, same values
    return act(h)


def norm_act(norm: GroupNorm, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm then activation; in inference the activation runs in place on the norm's fresh output."""
    return _act_(act, norm(x))


def nearest_2x(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bfloat16:  # nearest upsampling of bf16 is not implemented on every backend
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _banded(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether inference on x takes the row-band path: large maps, and maps stored narrower than ``weight``."""
    if torch.is_grad_enabled():
        return False
    return x.dtype != weight.dtype or (x.numel() > BAND_ELEMENTS and x.shape[2] > 2)


def _band_rows(x: torch.Tensor) -> int:
    return max(1, BAND_ELEMENTS // (x.numel() // x.shape[2]))


def conv_rows(conv: nn.Conv2d, x: torch.Tensor, pre, *, upsample: bool = False, out_dtype=None,
              inplace: bool = False) -> torch.Tensor:
    """``conv(pre(x))`` — or ``conv(nearest_2x(x))`` when ``upsample`` — for a 3×3 stride-1 conv with padding 1,
    computed in bands of rows: each band reads its rows of x plus one halo row on each side (zero rows only at the
    border of the map, as the conv's own padding would give), so ``pre(x)`` and the upsampled map are never whole.
    Bands are computed in the weights' dtype; the result is stored in ``out_dtype`` (default: x's dtype), or over x
    itself when ``inplace`` (same shape; the one row of ``pre(x)`` above each band is kept before it is overwritten).
    ``pre`` must return a new tensor when ``inplace``."""
    b, _, h, w = x.shape
    s = 2 if upsample else 1
    out = x if inplace else torch.empty(b, conv.out_channels, s * h, s * w, dtype=out_dtype or x.dtype, device=x.device)
    rows = max(1, BAND_ELEMENTS // (s * s * w * max(x.shape[1], conv.out_channels)))  # the larger of band in and out
    above = None  # inplace: pre(x) of the row above the band, saved before that row was overwritten
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        a, e = (r0 if inplace else max(r0 - 1, 0)), min(r1 + 1, h)  # input rows, with a one-row halo
        band = pre(x[:, :, a:e].to(conv.weight.dtype))
        if inplace:
            band = band if above is None else torch.cat([above, band], dim=2)
            a = max(r0 - 1, 0)
            above = band[:, :, r1 - 1 - a: r1 - a].clone()
        if upsample:  # keep one high-resolution halo row above and below the band's output rows
            band = nearest_2x(band)
            band = band[:, :, (1 if r0 > 0 else 0): (2 * (r1 - a) + 1 if r1 < h else None)]
        if r0 == 0 or r1 == h:  # zero rows at the map's border only, as the conv's own padding would give
            band = F.pad(band, (0, 0, int(r0 == 0), int(r1 == h)))  # (B, C, s·(r1 - r0) + 2, s·W)
        out[:, :, s * r0: s * r1] = F.conv2d(band, conv.weight, conv.bias, padding=(0, 1))
    return out


def norm_act_conv(norm: GroupNorm, act: nn.Module, conv: nn.Conv2d, x: torch.Tensor, *, out_dtype=None,
                  inplace: bool = False) -> torch.Tensor:
    """``conv(act(norm(x)))``; in inference on large or narrow-stored maps, in row bands (see ``conv_rows``), written
    over x when ``inplace`` (a map the caller no longer needs, as many channels in as out)."""
    if not _banded(x, conv.weight) or conv.kernel_size != (3, 3) or conv.stride != (1, 1):
        out = conv(norm_act(norm, act, x))
        return out if out_dtype is None else out.to(out_dtype)
    scale, shift = norm.scale_shift(x)
    return conv_rows(conv, x, lambda band: _act_(act, torch.addcmul(shift, band, scale)), out_dtype=out_dtype,
                     inplace=inplace and out_dtype in (None, x.dtype))


def _downsample_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(pad(x, (0, 1, 0, 1)))`` for the 3×3 stride-2 conv of ``Downsample``, in bands of output rows (output row
    j reads input rows 2j .. 2j + 2; the zero row below the map is the asymmetric padding)."""
    b, _, h, w = x.shape
    out = torch.empty(b, conv.out_channels, (h - 2) // 2 + 1, (w - 2) // 2 + 1, dtype=x.dtype, device=x.device)
    rows = max(1, _band_rows(x) // 2)  # output rows per band
    for j0 in range(0, out.shape[2], rows):
        j1 = min(j0 + rows, out.shape[2])
        band = x[:, :, 2 * j0: 2 * j1 + 1].to(conv.weight.dtype)
        band = F.pad(band, (0, 1, 0, 2 * (j1 - j0) + 1 - band.shape[2]))
        out[:, :, j0:j1] = F.conv2d(band, conv.weight, conv.bias, stride=2)
    return out


class SqueezeExcitation(nn.Module):
    """Channel gating ``h * 2·sigmoid(fc2(act(fc1(mean_hw(h)))))``; fc2 starts at zero, so the gate starts at exactly 1
    and a model loaded from plain KL-f8 weights gives the same outputs until it is fine-tuned.

    Its spatial mean is a whole-image statistic like GroupNorm's: tiling sets ``stats_hook`` (same contract as
    ``GroupNorm.stats_hook``) so that tiles are gated with the mean of the whole image."""

    stats_hook = None

    def __init__(self, *, channels: int, act_fn: str = "silu"):
        super().__init__()
        hidden = max(channels // SE_REDUCTION, 4)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = activation(act_fn)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = self.fc1.weight.dtype
        if self.stats_hook is None:
            pooled = h.mean(dim=(2, 3), keepdim=True, dtype=dtype)
        else:
            pooled = self.stats_hook(self, h)[0][..., None, None].to(dtype)
        gate = self.fc2(self.act(self.fc1(pooled)))  # (B, C, 1, 1)
        return h * (2.0 * torch.sigmoid(gate)).to(h.dtype)

    def statistics(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, biased var) of h, each (B, C) float32."""
        var, mean = channel_var_mean(h)
        return mean, var


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
        if not torch.is_grad_enabled():  # dropout is p=0 and acts as the identity: fuse norm → act → conv in bands
            h = norm_act_conv(self.norm1, self.nonlinearity, self.conv1, x)
            h = norm_act_conv(self.norm2, self.nonlinearity, self.conv2, h, inplace=True)  # h is our own temporary
        else:
            h = self.conv1(norm_act(self.norm1, self.nonlinearity, x))
            h = self.conv2(self.dropout(norm_act(self.norm2, self.nonlinearity, h)))
        if self.squeeze_excitation is not None:
            h = self.squeeze_excitation(h)
        if self.conv_shortcut is not None and _banded(x, self.conv_shortcut.weight):  # added band by band: no full-size temporary
            rows = _band_rows(x)
            for r0 in range(0, x.shape[2], rows):
                h[:, :, r0: r0 + rows].add_(self.conv_shortcut(x[:, :, r0: r0 + rows].to(self.conv_shortcut.weight.dtype)))
            return h
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
        if _banded(x, self.conv.weight):
            return _downsample_rows(self.conv, x)
        # torch conv has no asymmetric padding: pad (left 0, right 1, top 0, bottom 1), then conv with padding=0
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest ×2 upsampling, then a 3×3 conv."""

    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _banded(x, self.conv.weight):  # the ×2 map is never whole: upsample and convolve band by band
            return conv_rows(self.conv, x, lambda band: band, upsample=True)
        return self.conv(nearest_2x(x))  # (B, C, 2H, 2W)


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
        # registration order as diffusers' UNetMidBlock2D (attentions first): same state_dict()/named_parameters() order
        self.attentions = nn.ModuleList([SelfAttention(channels=channels, groups=groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(**block), ResnetBlock(**block)])

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

    def layers(self) -> list[nn.Module]:
        return [*self.resnets, *self.downsamplers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers():
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

    def layers(self) -> list[nn.Module]:
        return [*self.resnets, *self.upsamplers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers():
            x = layer(x)
        return x


class _CheckpointedStages(nn.Module):
    """Runs a stage through diffusers' gradient-checkpointing function when ``enable_gradient_checkpointing`` set it."""

    gradient_checkpointing = False

    def _run(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(stage, x)
        return stage(x)

    @staticmethod
    def _stages(blocks: nn.ModuleList) -> list[nn.Module]:
        """The blocks (with grad, the unit of checkpointing), or in inference their layers one by one: a caller that
        runs ``x = block(x)`` holds the block's input for the whole block, one more full-size map at the peak."""
        if torch.is_grad_enabled():
            return list(blocks)
        return [layer for block in blocks for layer in block.layers()]


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
        self.mid_block = MidBlock(channels=channels[0], groups=groups, act_fn=act_fn, add_attention=mid_block_add_attention)
        self.conv_norm_out = normalize(channels[-1], groups)
        self.conv_act = nn.SiLU()  # diffusers uses SiLU here whatever act_fn is
        self.conv_out = conv3(channels[-1], out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self._run(self.mid_block, x)
        x = x.to(self.up_blocks[0].resnets[0].conv1.weight.dtype)  # pipelines may keep only the mid block in fp32
        for stage in self._stages(self.up_blocks):
            x = self._run(stage, x)
        return norm_act_conv(self.conv_norm_out, self.conv_act, self.conv_out, x)
