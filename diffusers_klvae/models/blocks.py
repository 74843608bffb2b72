"""The layers of the KL-f8 autoencoder (GroupNorm, the residual block with its optional squeeze-and-excitation gate,
LDM's asymmetric downsample, the nearest ×2 upsample) and their low-memory inference path: large maps run through
them in bands of rows (``conv_rows``, ``norm_act_conv``), so no full-size temporary exists (``docs/tiling.md``).

Module and attribute names mirror diffusers' (``down_blocks.0.resnets.0.norm1``, ``upsamplers.0.conv`` ...), so a
state dict moves between ``KLVAE`` and ``AutoencoderKL`` with no key mapping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6  # GroupNorm eps of the LDM autoencoder (not torch's 1e-5): weights were trained with it
SE_REDUCTION = 16  # squeeze-and-excitation bottleneck: channels // 16 (a few thousand parameters in all)
ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


# Inference on maps larger than this (128 MB in float32: 1024² decodes and up; below, banding costs ~8% time for memory
# that is not the problem) runs the convolutions in bands of rows of about this many elements. Maps are computed in
# their own dtype, never the weights' (``enable_layerwise_casting`` stores those narrower and casts them inside their
# module's forward), which is also why every conv runs as a module call, never as ``F.conv2d(x, conv.weight)``.
BAND_ELEMENTS = 2**25


def base_layer(module: nn.Module) -> nn.Module:
    """The wrapped layer of a PEFT adapter layer (``lora.Conv2d``), else the module: where geometry is read."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def conv3(c_in: int, c_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kw)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and keys) whose statistics can come from outside.

    ``stats_hook`` is ``None`` except inside ``diffusers_klvae.models.tiling``, which sets it for the duration of a
    tiled call to a callable ``(module, x) -> (mean, var)``, each ``(B, groups)`` float32: tiles then normalize with
    statistics of the whole image instead of their own.
    """

    stats_hook = None

    def forward(self, x: torch.Tensor, return_scale_shift: bool = False):
        """``norm(x)``, or with ``return_scale_shift`` its ``scale_shift(x)``: the band path asks for those through
        the module call, so that hooks on the module (group offloading loads the weights, layerwise casting casts
        them) run before the weights are read."""
        if return_scale_shift:
            return self.scale_shift(x)
        if self.stats_hook is None:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        scale, shift = self.scale_shift(x)
        return torch.addcmul(shift, x, scale)

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (mean, biased var) of x, each (B, groups) float32, from per-channel moments (no copy of x)."""
        var_c, mean_c = channel_var_mean(x)  # (B, C)
        return group_moments(mean_c, var_c, self.num_groups)

    def scale_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift), each (B, C, 1, 1) in x's dtype, with ``norm(x) == x * scale + shift``."""
        mean, var = self.statistics(x) if self.stats_hook is None else self.stats_hook(self, x)
        per_group = x.shape[1] // self.num_groups
        rstd = torch.rsqrt(var + self.eps).repeat_interleave(per_group, dim=1)  # (B, C)
        mean = mean.repeat_interleave(per_group, dim=1)
        scale = rstd if self.weight is None else rstd * self.weight.float()
        shift = -mean * scale if self.bias is None else self.bias.float() - mean * scale
        return scale[..., None, None].to(x.dtype), shift[..., None, None].to(x.dtype)


def group_moments(mean_c: torch.Tensor, var_c: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased var), each (B, C) -> per-group ones, each (B, groups) (equal counts per channel)."""
    mean_c, var_c = mean_c.unflatten(1, (groups, -1)), var_c.unflatten(1, (groups, -1))
    mean = mean_c.mean(-1)
    return mean, (var_c + (mean_c - mean[..., None]).square()).mean(-1)


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


def act_inplace(act: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """act(h), in place on h (our own temporary) when grad is off and the activation allows it."""
    if not torch.is_grad_enabled() and isinstance(act, nn.SiLU):
        return F.silu(h, inplace=True)  # saves one full-size temporary per block, same values
    return act(h)


def norm_act(norm: GroupNorm, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm then activation; in inference the activation runs in place on the norm's fresh output."""
    return act_inplace(act, norm(x))


def nearest_2x(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bfloat16:  # nearest upsampling of bf16 is not implemented on every backend
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _banded(x: torch.Tensor) -> bool:
    """Whether inference on x runs in row bands: maps larger than ``BAND_ELEMENTS``."""
    if torch.is_grad_enabled():
        return False
    return x.numel() > BAND_ELEMENTS and x.shape[2] > 2


def _band_rows(x: torch.Tensor) -> int:
    return max(1, BAND_ELEMENTS // (x.numel() // x.shape[2]))


def conv_rows(conv: nn.Conv2d, x: torch.Tensor, pre, *, upsample: bool = False, inplace: bool = False) -> torch.Tensor:
    """``conv(pre(x))`` — or ``conv(nearest_2x(x))`` when ``upsample`` — for a 3×3 stride-1 conv with padding 1,
    computed in bands of rows: each band reads its rows of x plus one halo row on each side, so ``pre(x)`` and the
    upsampled map are never whole. The conv runs as a module call on the band: its own zero padding is right at the
    map's border, and the output rows of the halo (padded with zeros instead of their neighbours) are dropped.
    The result is a new tensor, or x itself when ``inplace`` (same shape; the one row of ``pre(x)`` above each band is
    kept before it is overwritten; ``pre`` must then return a new tensor)."""
    b, _, h, w = x.shape
    s = 2 if upsample else 1
    channels_out = base_layer(conv).out_channels
    out = x if inplace else torch.empty(b, channels_out, s * h, s * w, dtype=x.dtype, device=x.device)
    rows = max(1, BAND_ELEMENTS // (s * s * w * max(x.shape[1], channels_out)))  # the larger of band in and out
    above = None  # inplace: pre(x) of the row above the band, saved before that row was overwritten
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        a, e = max(r0 - 1, 0), min(r1 + 1, h)  # input rows of the band, with a one-row halo
        if inplace:  # rows above r0 are overwritten already: the halo row above comes from `above`
            band = pre(x[:, :, r0:e])
            band = band if above is None else torch.cat([above, band], dim=2)
            above = band[:, :, r1 - 1 - a: r1 - a].clone()
        else:
            band = pre(x[:, :, a:e])
        if upsample:
            band = nearest_2x(band)
        out[:, :, s * r0: s * r1] = conv(band)[:, :, s * (r0 - a): s * (r1 - a)]
    return out


def norm_act_conv(norm: GroupNorm, act: nn.Module, conv: nn.Conv2d, x: torch.Tensor, *,
                  inplace: bool = False) -> torch.Tensor:
    """``conv(act(norm(x)))``; in inference on large maps, in row bands (see ``conv_rows``), written
    over x when ``inplace`` (a map the caller no longer needs, as many channels in as out)."""
    geometry = base_layer(conv)
    if not _banded(x) or geometry.kernel_size != (3, 3) or geometry.stride != (1, 1):
        return conv(norm_act(norm, act, x))
    scale, shift = norm(x, return_scale_shift=True)
    return conv_rows(conv, x, lambda band: act_inplace(act, torch.addcmul(shift, band, scale)), inplace=inplace)


def _downsample_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``Downsample``'s ``conv(pad(x, (0, 1, 0, 1)))`` in bands of output rows (row j reads input rows 2j..2j + 2)."""
    b, _, h, w = x.shape
    out = torch.empty(b, base_layer(conv).out_channels, (h - 2) // 2 + 1, (w - 2) // 2 + 1, dtype=x.dtype,
                      device=x.device)
    rows = max(1, _band_rows(x) // 2)  # output rows per band
    for j0 in range(0, out.shape[2], rows):
        j1 = min(j0 + rows, out.shape[2])
        band = x[:, :, 2 * j0: 2 * j1 + 1]
        band = F.pad(band, (0, 1, 0, 2 * (j1 - j0) + 1 - band.shape[2]))
        out[:, :, j0:j1] = conv(band)
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
        if self.stats_hook is None:  # h's dtype, not the weights': layerwise casting may store them narrower
            pooled = h.mean(dim=(2, 3), keepdim=True)
        else:
            pooled = self.stats_hook(self, h)[0][..., None, None].to(h.dtype)
        gate = self.fc2(self.act(self.fc1(pooled)))  # (B, C, 1, 1)
        return h * (2.0 * torch.sigmoid(gate)).to(h.dtype)


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
        if self.conv_shortcut is not None and _banded(x):  # added band by band: no full-size temporary
            rows = _band_rows(x)
            for r0 in range(0, x.shape[2], rows):
                h[:, :, r0: r0 + rows].add_(self.conv_shortcut(x[:, :, r0: r0 + rows]))
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
        if _banded(x):
            return _downsample_rows(self.conv, x)
        # torch conv has no asymmetric padding: pad (left 0, right 1, top 0, bottom 1), then conv with padding=0
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest ×2 upsampling, then a 3×3 conv."""

    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _banded(x):  # the ×2 map is never whole: upsample and convolve band by band
            return conv_rows(self.conv, x, lambda band: band, upsample=True)
        return self.conv(nearest_2x(x))  # (B, C, 2H, 2W)


def upscale_dtype(decoder: nn.Module) -> torch.dtype:
    """The dtype the decoder's up blocks compute in: their first GroupNorm's weight dtype, as diffusers' ``Decoder``
    used to read it (for ``upcast_vae``, which keeps the mid block in float16 and the up blocks in float32). Not a
    conv's: ``enable_layerwise_casting`` stores those in float8/float16 and never casts GroupNorms."""
    return decoder.up_blocks[0].resnets[0].norm1.weight.dtype
