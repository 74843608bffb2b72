"""Nearest ×2 upsampling then a 3×3 conv, computed as four 2×2 convs of the map before upsampling (one per output
phase: even/odd row × even/odd column), 16 instead of 36 multiply-adds per input pixel and channel pair; the same
result up to float rounding (the kernel taps are sums of the 3×3 taps). Used by tiling for the upsamplers' convs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Kernel row r of a 3×3 conv after nearest ×2 upsampling reads input row i + (phase + r - 1) // 2 for output row
# 2i + phase: phase 0 reads input rows i - 1 (kernel row 0) and i (rows 1, 2), phase 1 rows i (rows 0, 1) and i + 1
# (row 2). Columns alike. (phase, tap, kernel row) → 1 where that kernel row is summed into that tap.
PHASE_TAPS = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=torch.float64)


def has_phase_form(conv: nn.Module) -> bool:
    """Whether ``upsample_conv`` applies: a plain ``nn.Conv2d`` (not an adapter wrapping one), 3×3, stride 1, zero
    padding 1."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


class PhaseForm:
    """``_conv_forward(x, weight, bias)`` of a 3×3 conv in the four-phase form: 2×2 kernels (4·C_out, C_in, 2, 2), row
    phase major, over x padded by one zero row and column each side; output (i + a, j + c) of phase (a, c) is the ×2
    map's pixel (2i + a, 2j + c). Kernel taps are sums of 3×3 taps in float64, rounded once; derived again only when
    the weights passed differ (hooks such as layerwise casting pass new tensors every call)."""

    def __init__(self):
        self.weight = self.kernel = self.bias = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight is None or not (weight is self.weight or torch.equal(weight, self.weight)):
            taps = PHASE_TAPS.to(weight.device)
            kernel = torch.einsum("ayk,cxl,oikl->acoiyx", taps, taps, weight.detach().double())
            self.weight, self.kernel = weight, kernel.reshape(-1, weight.shape[1], 2, 2).to(x.dtype)
            self.bias = None if bias is None else bias.detach().to(x.dtype).repeat(4)
        return F.conv2d(x, self.kernel, self.bias)


def upsample_conv(conv: nn.Conv2d, padded: torch.Tensor, phase_form: PhaseForm) -> torch.Tensor:
    """``conv(nearest_2x(x))`` (B, C_out, 2n, 2W) for rows of x given with one row of x (or of zeros, at the map's
    border) above and below and a zero column each side: ``padded`` (B, C_in, n + 2, W + 2). The conv runs as a module
    call with ``phase_form`` as its ``_conv_forward``, so that its hooks (layerwise casting, group offloading) run and
    hand it the weights an ordinary call would use."""
    b, _, n, w = padded.shape[0], padded.shape[1], padded.shape[2] - 2, padded.shape[3] - 2
    conv._conv_forward = phase_form
    try:
        phases = conv(padded).unflatten(1, (2, 2, -1))  # (B, 2, 2, C_out, n + 1, W + 1)
    finally:
        del conv._conv_forward  # back to nn.Conv2d's
    out = padded.new_empty(b, phases.shape[3], n, 2, w, 2)  # rows 2i + a, columns 2j + c of the ×2 map
    for a in (0, 1):
        for c in (0, 1):
            out[:, :, :, a, :, c] = phases[:, a, c, :, a: a + n, c: c + w]
    return out.view(b, -1, 2 * n, 2 * w)
