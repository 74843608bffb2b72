"""Seam-free tiled encode/decode at bounded memory.

Per-tile GroupNorm statistics are what give diffusers' tiled VAE its seams: every tile normalizes with its own
mean and variance, so neighbouring tiles disagree and a narrow blend cannot hide it. Here GroupNorms normalize with
the statistics of the *whole* image, and tiles are cropped, not blended:

1. Whole-map part. The lower-resolution layers (decoder: ``conv_in``, the mid block with its attention over the whole
   latent, then the up levels; encoder: the mirror image) run on the whole map, as long as each layer's largest map
   takes at most ``WHOLE_MAP_TILES`` times the bytes of the largest map of one tile. Above latent resolution a float32
   model stores these maps in bfloat16 and computes them in float32, in bands of rows (``blocks.conv_rows``):
   GroupNorm statistics are exact, and the only difference from the untiled result is the bfloat16 rounding of the
   stored maps (≥ 55 dB PSNR).
   When the whole image fits this budget (up to about 2×2 tiles), nothing else runs: one pass, exact statistics.
2. Tiled part: the remaining high-resolution layers run tile by tile. Each tile is computed with a halo at least as
   wide as that part's receptive field, so the core of a tile sees exactly the pixels the untiled network would, and
   only the core is kept. Cores cover the image without overlap, for any image size.
3. Statistics pass (tiled part only): the tiles run once, each GroupNorm normalizing with the tile's own statistics
   while its per-group moments over the tile's core are accumulated (Chan's parallel formula, float64) into
   whole-image statistics. ``STAT_PASSES`` such passes may run, each normalizing with the previous pass's statistics
   (pass k makes the k-th GroupNorm of the tiled part exact).
4. Output pass: the tiles run again, every GroupNorm using the whole-image statistics, and the cores are written
   into the result.

Only step 3 is approximate. Memory is bounded by one tile of the tiled part plus the whole-map part, which holds at
most ``WHOLE_MAP_TILES`` times the bytes of a tile's largest map. See ``docs/tiling.md`` for measured figures.

The statistics reach the GroupNorm modules (and the spatial means of squeeze-and-excitation gates, the other
whole-image statistic) through their ``stats_hook``, set only inside ``_group_norm_hook`` for the duration of a
pass and removed afterwards.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from .blocks import (Downsample, GroupNorm, ResnetBlock, SqueezeExcitation, Upsample, base_layer, computing_in, conv_rows,
                     merge_moments, norm_act_conv, upscale_dtype)

# Statistics passes of the tiled part (images beyond the whole-map budget) before its output pass. Each pass makes one
# more GroupNorm exact and costs one more pass over the tiles; docs/tiling.md gives the fidelity of one.
STAT_PASSES = 1
# A layer runs on the whole map when its largest map, as stored, takes at most this many times the bytes of the largest
# map of one tile in the model's dtype (diffusers' tiled decode holds about four such maps at its peak). A float32
# model stores whole maps in bfloat16: 4× a tile's values.
WHOLE_MAP_TILES = 2
STORAGE_DTYPE = torch.bfloat16  # whole maps of a float32 model: half the memory, exponent range of float32


def tiled_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """latents (B, latent_channels, h, w) → images (B, out_channels, h·f, w·f) (see the module docstring).

    Tiles of the tiled part span at most ``vae.tile_latent_min_size`` latent pixels, halo included.
    """
    decoder = vae.decoder
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    if max(z.shape[-2:]) <= vae.tile_latent_min_size:  # one tile covers it: the untiled network, exactly
        return decoder(z)
    x = decoder.mid_block(decoder.conv_in(z))
    x = x.to(upscale_dtype(decoder))  # as Decoder.forward: the mid block may run in another dtype
    with computing_in(x.dtype):  # x's dtype, not a weight's: layerwise casting stores those narrower
        return _tiled_up_levels(vae, x, z.shape[-2] * z.shape[-1])


def _tiled_up_levels(vae, x: torch.Tensor, pixels: int) -> torch.Tensor:
    """The decoder from its up blocks on, for the mid block's output x (in the compute dtype) of ``pixels`` latents."""
    decoder, dtype = vae.decoder, x.dtype
    layers = [layer for block in decoder.up_blocks for layer in block.layers()]
    sizes = _largest_maps(layers, pixels)
    budget = _whole_map_budget(sizes, vae.tile_latent_min_size**2 / pixels, dtype)
    split = next((i for i, size in enumerate(sizes) if size > budget), len(layers))
    x = x.to(_storage(dtype)) if split else x
    for layer in layers[:split]:
        x = layer(x)
    tiled = layers[split:]
    if not tiled:
        return norm_act_conv(decoder.conv_norm_out, decoder.conv_act, decoder.conv_out, x, out_dtype=dtype)

    def high_res(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype)
        for layer in tiled:
            t = layer(t)
        return norm_act_conv(decoder.conv_norm_out, decoder.conv_act, decoder.conv_out, t)

    scale = 2 ** sum(isinstance(layer, Upsample) for layer in layers[:split])  # resolution of x (× latent)
    halo = math.ceil(_receptive_field(tiled, tail_convs=1))  # in pixels of x
    tile = max(vae.tile_latent_min_size * scale, 1)
    return _run_tiled(high_res, [*tiled, decoder.conv_norm_out], x, tile=tile, halo=halo, align=1,
                      out_scale=vae.downsampling_factor // scale, stat_passes=_stat_passes(vae), out_dtype=dtype)


def tiled_encode(vae, x: torch.Tensor) -> torch.Tensor:
    """images (B, in_channels, H, W) → moments (B, 2·latent_channels, H/f, W/f) (see the module docstring).

    Tiles of the tiled part span at most ``vae.tile_sample_min_size`` pixels, halo included.
    """
    if max(x.shape[-2:]) <= vae.tile_sample_min_size:  # one tile covers it: the untiled network, exactly
        moments = vae.encoder(x)
    else:
        with computing_in(x.dtype):  # x's dtype, not a weight's: layerwise casting stores those narrower
            moments = _tiled_encoder(vae, x)
    return moments if vae.quant_conv is None else vae.quant_conv(moments)


def _tiled_encoder(vae, x: torch.Tensor) -> torch.Tensor:
    """``vae.encoder(x)`` with the whole-map and tiled parts of the module docstring; x is in the compute dtype."""
    encoder, dtype = vae.encoder, x.dtype
    layers = [encoder.conv_in] + [layer for block in encoder.down_blocks for layer in block.layers()]
    pixels = x.shape[-2] * x.shape[-1]
    sizes = _largest_maps(layers, pixels)
    budget = _whole_map_budget(sizes, vae.tile_sample_min_size**2 / pixels, dtype)
    split = max((i + 1 for i, size in enumerate(sizes) if size > budget), default=0)  # layers[split:] run whole
    tiled = layers[:split]
    scale = 0.5 ** sum(isinstance(layer, Downsample) for layer in tiled)  # resolution (× image) after the tiled part
    align = round(1 / scale)  # tile edges on the grid of every stride-2 conv of the tiled part

    def high_res(t: torch.Tensor) -> torch.Tensor:
        for layer in tiled:
            t = layer(t)
        return t

    store = _storage(dtype)
    if tiled:
        halo = math.ceil(_receptive_field(tiled) / align) * align
        tile = max(vae.tile_sample_min_size // align * align, align)
        h = _run_tiled(high_res, tiled, x, tile=tile, halo=halo, align=align, out_scale=scale,
                       stat_passes=_stat_passes(vae), out_dtype=store)
    else:  # conv_in computed in the model's dtype, its full-resolution output stored narrow
        h = conv_rows(encoder.conv_in, x, lambda band: band, out_dtype=store) if store != dtype else encoder.conv_in(x)
        split = 1
    for layer in layers[split:]:
        h = layer(h)
    h = encoder.mid_block(h.to(dtype))
    return norm_act_conv(encoder.conv_norm_out, encoder.conv_act, encoder.conv_out, h)


def _storage(dtype: torch.dtype) -> torch.dtype:
    """The dtype whole maps are stored in: bfloat16 for a float32 model (computed in float32 band by band)."""
    return STORAGE_DTYPE if dtype == torch.float32 else dtype


def _largest_maps(layers: list[nn.Module], pixels: int) -> list[int]:
    """For each layer, the values (per sample) of the largest map it reads or writes, for an input of ``pixels``."""
    sizes = []
    for layer in layers:
        conv = layer.conv1 if isinstance(layer, ResnetBlock) else layer.conv if isinstance(layer, (Upsample, Downsample)) else layer
        conv = base_layer(conv)  # a PEFT adapter wraps the conv
        if isinstance(layer, Upsample):
            pixels *= 4
        sizes.append(max(conv.in_channels, conv.out_channels) * pixels)
        if isinstance(layer, Downsample):
            pixels //= 4
    return sizes


def _whole_map_budget(sizes: list[int], tile_fraction: float, dtype: torch.dtype) -> float:
    """Values a whole map may hold: ``WHOLE_MAP_TILES`` × the bytes of the largest map of one tile (a ``tile_fraction``
    of the image) in ``dtype``, stored in ``_storage(dtype)``."""
    return WHOLE_MAP_TILES * dtype.itemsize / _storage(dtype).itemsize * max(sizes) * min(tile_fraction, 1.0)


def _stat_passes(vae) -> int:
    """``vae.tile_stat_passes`` when set (e.g. by ``enable_tiling(stat_passes=...)``), else ``STAT_PASSES``."""
    return int(getattr(vae, "tile_stat_passes", None) or STAT_PASSES)


def _receptive_field(layers: list[nn.Module], *, tail_convs: int = 0) -> float:
    """How far (in pixels of the input) an output pixel of ``layers`` (then ``tail_convs`` 3×3 convs) can see."""
    scale, reach = 1.0, 0.0  # scale: resolution of the current map relative to the input
    for layer in layers:
        if isinstance(layer, ResnetBlock):
            reach += 2 / scale  # two 3×3 convs
        elif isinstance(layer, Upsample):
            scale *= 2
            reach += 1 / scale  # 3×3 conv after the ×2 upsampling
        elif isinstance(layer, Downsample):
            reach += 2 / scale  # 3×3 stride-2 conv: output j reads inputs 2j .. 2j + 2
            scale /= 2
        elif isinstance(base_layer(layer), nn.Conv2d):
            reach += (base_layer(layer).kernel_size[0] // 2) / scale
        else:
            raise TypeError(f"no receptive field known for {type(layer).__name__}")
    return reach + tail_convs / scale


def _spans(length: int, tile: int, halo: int, align: int) -> list[tuple[int, int]]:
    """Split [0, length) into near-equal cores (edges on multiples of ``align``) whose tiles, halo included, span
    at most ``tile`` (or one core of ``align`` when the halo alone fills the tile)."""
    core = max((tile - 2 * halo) // align * align, align)
    count = math.ceil(length / core)
    units = length // align
    edges = [min(round(units * i / count) * align, length) for i in range(count + 1)]
    edges[-1] = length
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _run_tiled(fn, modules: list[nn.Module], x: torch.Tensor, *, tile: int, halo: int, align: int, out_scale: float,
               stat_passes: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``fn(x)`` for a map-to-map network part ``fn`` whose GroupNorms are in ``modules``, tile by tile."""
    h, w = x.shape[-2:]
    tiles = [(rows, cols) for rows in _spans(h, tile, halo, align) for cols in _spans(w, tile, halo, align)]
    # every whole-image statistic of the tiled part: GroupNorms, and the spatial means of squeeze-and-excitation gates
    norms = [m for module in modules for m in module.modules() if isinstance(m, (GroupNorm, SqueezeExcitation))]
    previous = None
    for _ in range(max(stat_passes, 1)):
        current = _Statistics()
        for (r0, r1), (c0, c1) in tiles:
            a, b, c, d = max(r0 - halo, 0), min(r1 + halo, h), max(c0 - halo, 0), min(c1 + halo, w)
            core = (r0 - a, r1 - a, c0 - c, c1 - c)
            with _group_norm_hook(norms, current.recording_hook(core, b - a, previous)):
                fn(x[:, :, a:b, c:d])
        previous = current
    out = None
    for (r0, r1), (c0, c1) in tiles:
        a, b, c, d = max(r0 - halo, 0), min(r1 + halo, h), max(c0 - halo, 0), min(c1 + halo, w)
        with _group_norm_hook(norms, previous.hook):
            y = fn(x[:, :, a:b, c:d])
        if out is None:
            out = y.new_empty(*y.shape[:2], round(h * out_scale), round(w * out_scale), dtype=out_dtype)
        s = out_scale
        out[:, :, round(r0 * s): round(r1 * s), round(c0 * s): round(c1 * s)] = (
            y[:, :, round((r0 - a) * s): round((r1 - a) * s), round((c0 - c) * s): round((c1 - c) * s)])
    return out


@contextmanager
def _group_norm_hook(norms: list[GroupNorm], hook):
    """Make ``norms`` take their statistics from ``hook`` inside the ``with`` block."""
    for norm in norms:
        norm.stats_hook = hook
    try:
        yield
    finally:
        for norm in norms:
            del norm.stats_hook  # back to the class default (None): ordinary GroupNorm


class _Statistics:
    """Whole-image GroupNorm statistics accumulated from the cores of the tiles, keyed by module."""

    def __init__(self):
        self.moments: dict[GroupNorm, tuple[float, torch.Tensor, torch.Tensor]] = {}  # count, mean, M2 (float64)

    def add(self, norm: GroupNorm, core: torch.Tensor) -> None:
        mean, var = norm.statistics(core)  # (B, groups or channels)
        count = core[0].numel() // mean.shape[1]
        mean, m2 = mean.double(), var.double() * count
        part = (count, mean, m2)
        self.moments[norm] = part if norm not in self.moments else merge_moments(self.moments[norm], part)

    def hook(self, norm: GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-image (mean, var) of ``norm``'s input."""
        n, mean, m2 = self.moments[norm]
        return mean.float(), (m2 / n).float()

    def recording_hook(self, core: tuple[int, int, int, int], tile_rows: int, previous: "_Statistics | None"):
        """A hook that adds the moments over the tile's ``core`` (rows r0:r1, cols c0:c1 in pixels of the tile's
        input map, which is ``tile_rows`` high) and normalizes with ``previous`` statistics, or the tile's own."""
        r0, r1, c0, c1 = core

        def hook(norm: GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s = x.shape[2] / tile_rows  # this layer's resolution relative to the tile's input
            self.add(norm, x[:, :, round(r0 * s): round(r1 * s), round(c0 * s): round(c1 * s)])
            return norm.statistics(x) if previous is None else previous.hook(norm, x)

        return hook
