"""Tiled encode/decode equal to the untiled network, at device memory bounded by a budget.

Per-tile GroupNorm statistics are what give diffusers' tiled VAE its seams: every tile normalizes with its own mean
and variance, so neighbouring tiles disagree and a narrow blend cannot hide it. Here there are no tiles to disagree:
the network runs layer by layer over *whole* maps, and only the computation is cut into pieces.

- Every map between two layers lives whole in a store (``_Store``): on the compute device while the maps held there
  fit ``MAP_SHARE`` of the budget, otherwise in host memory (pinned when the device is CUDA), or with
  ``map_store="file"`` in a memory-mapped temporary file, so that a CPU user can bound RAM too.
- A layer streams bands of full rows of its input through the device, each band with the halo rows its conv needs
  (one row each side for a 3×3 conv), and writes its bands of output into a new map: nothing is recomputed, and the
  band height is chosen so that the band's temporaries fit what the maps on the device leave of the budget.
- GroupNorm statistics (and the spatial means of squeeze-and-excitation gates) are exact: while a layer writes its
  output, the per-channel moments of every band are merged (Chan's formula, float64) into whole-map moments, which
  the next layer's GroupNorm then uses for every band. So each layer is one sweep over its input, two for a resnet.
- The mid-block attention attends over the whole latent-resolution map: its keys and values are held whole on the
  device (two latent-sized maps), and the queries are streamed in bands.

The only difference from the untiled network is the rounding of the stored maps: a float32 model stores them in
float16 with a power-of-two scale per row and channel by default (``storage_dtype=torch.float32`` stores them
exactly, ``torch.bfloat16`` without scales). The budget bounds the maps held on the
device and the bands; it does not cover the weights, the returned output, the caller's input, or the attention's keys
and values (counted while they live, but held whatever the budget). Bands are full rows: a map so wide that one row of a layer's band exceeds the budget still runs, one row at a
time, above the budget (tiles of width too would be needed there). See ``docs/tiling.md`` for measured figures.

The statistics reach the GroupNorm modules through their ``stats_hook``, set only for the duration of a pass
(``_statistics_of``), so that every GroupNorm and conv still runs as a module call (hooks of layerwise casting,
group offloading and PEFT adapters run as untiled).
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from .blocks import (Downsample, GroupNorm, ResnetBlock, SqueezeExcitation, Upsample, _act_, base_layer, computing_in,
                     merge_moments, nearest_2x, upscale_dtype)

# Default budget: this many times the bytes of the largest map of one tile in the model's dtype. diffusers' tiled decode
# holds about four such maps at its peak, so the default bounds device memory as its tiles do.
DEVICE_TILES = 4
# Of the budget, whole maps may take this share on the device (a resnet holds two at a time, its input and output);
# the rest is for the bands being computed.
MAP_SHARE = 0.75
# The bytes of a band's tensors that the row estimate counts, times this, must fit: convolution kernels reorder and pad
# their inputs in workspaces the estimate does not see.
WORKSPACE_FACTOR = 1.5
# Maps of a float32 model by default: half the memory. float16 with a power-of-two scale per row and channel
# (``_Map``): ~18 dB closer to untiled than bfloat16, and no overflow.
STORAGE_DTYPE = torch.float16
SCALED_MAX_EXPONENT = 15  # scaled rows stay below 2**15 < 65504, float16's largest value
MAP_STORES = ("memory", "file")
FAULT_AROUND_BYTES = 2**20  # above Linux's fault-around window (64 kB by default): see _FileMap._drop


def tiled_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """latents (B, latent_channels, h, w) → images (B, out_channels, h·f, w·f), the untiled decoder's result up to the
    rounding of the stored maps (see the module docstring). Latents no larger than ``vae.tile_latent_min_size``, and
    calls with autograd on (gradients need every activation anyway), run the untiled decoder."""
    decoder = vae.decoder
    if max(z.shape[-2:]) <= vae.tile_latent_min_size or torch.is_grad_enabled():
        return decoder(z if vae.post_quant_conv is None else vae.post_quant_conv(z))
    layers = [layer for block in decoder.up_blocks for layer in block.layers()]
    up_dtype = upscale_dtype(decoder)  # as Decoder.forward: the mid block may run in another dtype (upcast_vae)
    store = _Store.for_call(vae, z, up_dtype, layers, vae.tile_latent_min_size**2)
    with computing_in(z.dtype):  # z's dtype, not a weight's: layerwise casting stores those narrower
        # post_quant_conv (1×1) runs on conv_in's bands: not even the latents are transformed whole
        x = _conv_pass(store, decoder.conv_in, _Map.wrap(store, z), pre=vae.post_quant_conv)
        x = _mid_block(store, decoder.mid_block, x)
    store.dtype = up_dtype
    with computing_in(up_dtype):
        for layer in layers:
            x = _layer(store, layer, x)
        b, _, h, w = x.shape
        out = _Map.wrap(store, torch.empty(b, base_layer(decoder.conv_out).out_channels, h, w, dtype=up_dtype,
                                           device=z.device))
        _conv_pass(store, decoder.conv_out, x, out, pre=_norm_act(decoder.conv_norm_out, decoder.conv_act, x, store))
    x.free()
    return out.tensor


def tiled_encode(vae, x: torch.Tensor) -> torch.Tensor:
    """images (B, in_channels, H, W) → moments (B, 2·latent_channels, H/f, W/f), the untiled encoder's result up to
    the rounding of the stored maps (see the module docstring). Images no larger than ``vae.tile_sample_min_size``,
    and calls with autograd on, run the untiled encoder."""
    encoder = vae.encoder
    if max(x.shape[-2:]) <= vae.tile_sample_min_size or torch.is_grad_enabled():
        moments = encoder(x)
        return moments if vae.quant_conv is None else vae.quant_conv(moments)
    layers = [encoder.conv_in] + [layer for block in encoder.down_blocks for layer in block.layers()]
    store = _Store.for_call(vae, x, x.dtype, layers, vae.tile_sample_min_size**2)
    with computing_in(x.dtype):  # x's dtype, not a weight's: layerwise casting stores those narrower
        h = _conv_pass(store, encoder.conv_in, _Map.wrap(store, x))
        for layer in layers[1:]:
            h = _layer(store, layer, h)
        h = _mid_block(store, encoder.mid_block, h)
        b, _, rows, cols = h.shape
        channels = base_layer(vae.quant_conv or encoder.conv_out).out_channels
        out = _Map.wrap(store, torch.empty(b, channels, rows, cols, dtype=x.dtype, device=x.device))
        # quant_conv (1×1) runs on conv_out's bands, written straight into the returned moments
        _conv_pass(store, encoder.conv_out, h, out, pre=_norm_act(encoder.conv_norm_out, encoder.conv_act, h, store),
                   post=vae.quant_conv)
    h.free()
    return out.tensor


# ------------------------------------------------------------------ the map store
class _Store:
    """Where the whole maps of one tiled call live, and how many rows a band may have.

    Args:
        device (`torch.device`): the compute device.
        dtype (`torch.dtype`): the compute dtype (bands are computed in it; ``dtype`` changes after the decoder's mid
            block under ``upcast_vae``).
        storage (`torch.dtype`): the dtype maps are stored in.
        budget (`int`): bytes of the device the maps held there and the bands may take.
        kind (`str`, defaults to ``"memory"``): where maps that do not fit the device go: ``"memory"`` (host memory,
            pinned for CUDA) or ``"file"`` (a memory-mapped temporary file in ``folder``).
        folder (`str`, *optional*): directory of the ``"file"`` maps (default: ``tempfile.gettempdir()``).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, storage: torch.dtype, budget: int, *,
                 kind: str = "memory", folder: str | None = None):
        if kind not in MAP_STORES:
            raise ValueError(f"map_store must be one of {MAP_STORES}; got {kind!r}")
        self.device, self.dtype, self.storage, self.budget = device, dtype, storage, int(budget)
        self.kind, self.folder = kind, folder
        self.on_device = 0  # bytes of the whole maps held on the device now

    @classmethod
    def for_call(cls, vae, x: torch.Tensor, dtype: torch.dtype, layers: list[nn.Module], tile_pixels: int) -> "_Store":
        """The store of a tiled call on ``x``, with the model's tiling settings; the default budget is ``DEVICE_TILES``
        times the largest map of one tile of ``tile_pixels`` input pixels through ``layers``, in ``dtype``."""
        budget = getattr(vae, "tile_max_device_bytes", None)
        if budget is None:
            budget = DEVICE_TILES * max(_largest_maps(layers, tile_pixels)) * dtype.itemsize
        storage = getattr(vae, "tile_storage_dtype", None) or (STORAGE_DTYPE if dtype == torch.float32 else dtype)
        return cls(x.device, x.dtype, storage, budget, kind=getattr(vae, "tile_map_store", None) or "memory",
                   folder=getattr(vae, "tile_map_dir", None))

    def new(self, shape: tuple[int, ...]) -> "_Map":
        """An empty map of ``shape`` (B, C, H, W): on the device while the maps there fit ``MAP_SHARE`` of the budget."""
        nbytes = math.prod(shape) * self.storage.itemsize
        if self.on_device + nbytes <= MAP_SHARE * self.budget:
            self.on_device += nbytes
            return _Map(self, torch.empty(shape, dtype=self.storage, device=self.device), counted=nbytes)
        if self.kind == "file":
            return _FileMap(self, shape)
        pin = self.device.type == "cuda"  # pinned host memory: faster copies to and from the device
        return _Map(self, torch.empty(shape, dtype=self.storage, pin_memory=pin))

    def rows(self, per_row: float, halo: float = 0) -> int:
        """Rows of a band whose tensors take ``per_row`` bytes per row (plus ``halo`` rows), within what the maps on the
        device leave of the budget; at least one."""
        free = self.budget - self.on_device
        return max(1, int(free / (WORKSPACE_FACTOR * per_row)) - math.ceil(halo))


class _Map:
    """A whole map (B, C, H, W) held as a tensor (on the device or in host memory), read and written in bands of rows.

    While a pass writes it, the per-channel moments of the bands written are merged into whole-map moments
    (``moments``: count per channel, mean and M2 in float64, each (B, C)): the GroupNorm statistics of the next layer.

    Stored in float16 for a wider compute dtype, every row of every channel is scaled by a power of two that brings its
    largest magnitude just under 2¹⁵ (``exponents``, (B, C, H) int32 on the device): float16's 11-bit precision
    without its range limit (the SD VAE's activations overflow float16), 8× finer than bfloat16 in the same bytes.
    """

    def __init__(self, store: _Store, tensor: torch.Tensor | None, *, counted: int = 0, track: bool = True,
                 shape: tuple[int, ...] | None = None):
        self.store, self.tensor, self.counted, self.track = store, tensor, counted, track
        self.on_device = counted > 0  # held on the device within the budget (else in host memory or a file)
        self.moments = None
        self._shape = torch.Size(shape if shape is not None else tensor.shape)
        scaled = track and store.storage == torch.float16 and store.dtype != torch.float16
        b, c, h, _ = self._shape
        self.exponents = torch.zeros(b, c, h, dtype=torch.int32, device=store.device) if scaled else None
        if scaled:  # on the device whatever the store: counted in the budget (2/W of the map's bytes)
            store.on_device += self.exponents.nbytes
            self.counted += self.exponents.nbytes

    @classmethod
    def wrap(cls, store: _Store, tensor: torch.Tensor) -> "_Map":
        """A map over a tensor the caller owns (the input, the returned output): not counted in the budget, stored as
        it is, and no layer normalizes it (no moments)."""
        return cls(store, tensor, track=False)

    @property
    def shape(self) -> torch.Size:
        return self._shape

    def _get(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 as stored (a view of the tensor)."""
        return self.tensor[:, :, r0:r1]

    def _put(self, r0: int, band: torch.Tensor) -> None:
        """Store ``band`` (already in the storage dtype, on the compute device) at rows r0.."""
        self.tensor[:, :, r0: r0 + band.shape[2]] = band

    def read(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 on the compute device in the compute dtype (a view when the map is stored that way: callers
        must not write into it)."""
        band = self._get(r0, r1).to(self.store.device)
        if self.exponents is None:
            return band.to(self.store.dtype)
        scale = torch.exp2((self.exponents[:, :, r0:r1] - SCALED_MAX_EXPONENT).to(self.store.dtype))
        return band.to(self.store.dtype).mul_(scale[..., None])  # a power of two: exact

    def begin(self) -> None:
        """Start a pass writing the map: its moments restart from nothing."""
        self.moments = None

    def write(self, r0: int, band: torch.Tensor) -> None:
        """Store the computed ``band`` at rows r0.., and merge its moments (of the computed values, before the
        storage rounding: what the untiled network normalizes). A scaled map scales ``band`` in place: callers pass
        their own temporaries."""
        if self.track:
            wide = band if band.dtype in (torch.float32, torch.float64) else band.float()  # half: float32 moments
            var, mean = torch.var_mean(wide, dim=(2, 3), correction=0)
            count = band.shape[2] * band.shape[3]
            part = (count, mean.double(), var.double() * count)
            self.moments = part if self.moments is None else merge_moments(self.moments, part)
        if self.exponents is not None:  # |band| < 2**exponent per row and channel → |scaled| < 2**SCALED_MAX_EXPONENT
            low, high = torch.aminmax(band, dim=3)  # no full-size temporary, unlike band.abs()
            exponent = torch.frexp(torch.maximum(-low, high)).exponent
            self.exponents[:, :, r0: r0 + band.shape[2]] = exponent
            band.mul_(torch.exp2((SCALED_MAX_EXPONENT - exponent).to(band.dtype))[..., None])
        self._put(r0, band.to(self.store.storage))

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, biased var) of the whole map, each (B, C) float64."""
        n, mean, m2 = self.moments
        return mean, m2 / n

    def group_stats(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (mean, biased var) of the whole map, each (B, groups) float64 (every channel has n values)."""
        n, mean, m2 = self.moments
        b = mean.shape[0]
        mean_c, m2_c = mean.view(b, groups, -1), m2.view(b, groups, -1)
        mean_g = mean_c.mean(-1)
        m2_g = m2_c.sum(-1) + n * (mean_c - mean_g[..., None]).square().sum(-1)
        return mean_g, m2_g / (n * mean_c.shape[-1])

    def free(self) -> None:
        """Release the map (its device bytes return to the budget)."""
        self.store.on_device -= self.counted
        self.counted, self.tensor, self.exponents = 0, None, None


class _FileMap(_Map):
    """A map in a memory-mapped temporary file, laid out (H, B, C, W) so that a band of rows is one byte range. The
    file is unlinked at once (the mapping keeps it until freed), and the pages of a band are dropped from the process
    (``MADV_DONTNEED``) after each read or write, so that they count in the page cache, not in the process's RAM."""

    def __init__(self, store: _Store, shape: tuple[int, ...]):
        super().__init__(store, None, shape=shape)
        b, c, h, w = shape
        self.row_bytes = b * c * w * store.storage.itemsize
        fd, path = tempfile.mkstemp(prefix="klvae-map-", suffix=".bin", dir=store.folder)
        try:
            os.ftruncate(fd, max(h * self.row_bytes, 1))
            self.file = np.memmap(path, dtype=np.uint8, mode="r+", shape=(h, self.row_bytes))
        finally:
            os.close(fd)
            os.unlink(path)

    def _rows(self, r0: int, r1: int) -> torch.Tensor:
        b, c, _, w = self._shape
        return torch.from_numpy(self.file[r0:r1]).view(self.store.storage).view(r1 - r0, b, c, w)

    def _drop(self, r0: int, r1: int) -> None:
        # FAULT_AROUND_BYTES more on each side: a read fault also maps the neighbouring cached pages (the kernel's
        # fault-around), rows of bands already dropped among them
        start = max(r0 * self.row_bytes - FAULT_AROUND_BYTES, 0) // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(r1 * self.row_bytes + FAULT_AROUND_BYTES, len(self.file._mmap))
        self.file._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _get(self, r0: int, r1: int) -> torch.Tensor:
        b, c, _, w = self._shape
        band = torch.empty(b, c, r1 - r0, w, dtype=self.store.storage)
        band.copy_(self._rows(r0, r1).permute(1, 2, 0, 3))  # a copy: the file's pages are dropped next
        self._drop(r0, r1)
        return band

    def _put(self, r0: int, band: torch.Tensor) -> None:
        r1 = r0 + band.shape[2]
        self._rows(r0, r1).copy_(band.permute(2, 0, 1, 3))
        self._drop(r0, r1)

    def free(self) -> None:
        super().free()
        self.file = None  # the mapping closes with its last reference


# ------------------------------------------------------------------ layers, streamed
def _layer(store: _Store, layer: nn.Module, x: _Map) -> _Map:
    """``layer(x)`` for a layer of the up/down blocks, as a new map; x is freed."""
    if isinstance(layer, ResnetBlock):
        return _resnet(store, layer, x)
    if isinstance(layer, Upsample):
        out = _conv_pass(store, layer.conv, x, kind="up")
    elif isinstance(layer, Downsample):
        out = _conv_pass(store, layer.conv, x, kind="down")
    else:
        raise TypeError(f"expected a ResnetBlock, Upsample or Downsample layer; got {type(layer).__name__}")
    x.free()
    return out


def _resnet(store: _Store, block: ResnetBlock, x: _Map) -> _Map:
    """``block(x)`` in two passes (three with a squeeze-and-excitation gate); x is freed.

    conv1 writes a new map h; conv2 writes over h (the row above each band is kept before it is overwritten) and adds
    the shortcut of x band by band: two maps at a time, as the untiled inference path."""
    h = _conv_pass(store, block.conv1, x, pre=_norm_act(block.norm1, block.nonlinearity, x, store))
    pre = _norm_act(block.norm2, block.nonlinearity, h, store)
    shortcut = None if block.squeeze_excitation is not None else _shortcut(block, x)
    _conv_pass(store, block.conv2, h, h, pre=pre, add=shortcut)
    if block.squeeze_excitation is not None:  # the gate needs the whole-map mean of conv2's output: one more pass
        _pointwise_pass(store, h, _gate(block, h, x))
    x.free()
    return h


def _shortcut(block: ResnetBlock, x: _Map):
    """Rows r0:r1 of the block's shortcut of x."""
    if block.conv_shortcut is None:
        return lambda r0, r1: x.read(r0, r1)
    return lambda r0, r1: block.conv_shortcut(x.read(r0, r1))


def _gate(block: ResnetBlock, h: _Map, x: _Map):
    """Band r0:r1 of ``gate(h) + shortcut(x)``, the gate pooling with the whole-map mean of h."""
    gate, shortcut = block.squeeze_excitation, _shortcut(block, x)
    stats = h.channel_stats()  # now: the pass that rewrites h restarts its moments

    def band(r0: int, r1: int) -> torch.Tensor:
        with _statistics_of([gate], lambda module, t: stats):
            return gate(h.read(r0, r1)).add_(shortcut(r0, r1))

    return band


def _mid_block(store: _Store, mid, x: _Map) -> _Map:
    """resnet → attention over the whole map → resnet; x is freed."""
    x = _resnet(store, mid.resnets[0], x)
    for attention in mid.attentions:
        x = _attention(store, attention, x)
    return _resnet(store, mid.resnets[1], x)


def _attention(store: _Store, attn, x: _Map) -> _Map:
    """``attn(x)`` (single-head self-attention over all pixels, with residual); x is freed.

    With diffusers' default processor (``AttnProcessor2_0``, what it computes is known), streamed: the keys and values
    of the whole map are computed band by band and held on the device (two maps of the latent's size, counted against
    the budget while they live, and allowed beyond it), then each band of queries attends to all of them. Any other
    processor (a custom one, ``FusedAttnProcessor2_0`` after ``fuse_qkv_projections``) gets the whole map on the
    device, as untiled."""
    b, c, h, w = x.shape
    if type(attn.processor) is not AttnProcessor2_0 or attn.heads != 1:
        y = attn(x.read(0, h))
        x.free()
        out = store.new(tuple(y.shape))
        out.begin()
        out.write(0, y)
        return out
    probe = torch.empty(b, c, 1, 1, dtype=store.dtype, device=store.device)
    with _statistics_of([attn.group_norm], lambda module, t: x.group_stats(module.num_groups)):
        scale, shift = attn.group_norm(probe, return_scale_shift=True)

    def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, rows, W) → normalized (B, rows·W, C)
        return torch.addcmul(shift, t, scale).flatten(2).transpose(1, 2)

    kv_bytes = 2 * b * h * w * c * store.dtype.itemsize
    store.on_device += kv_bytes
    keys = torch.empty(b, 1, h * w, c, dtype=store.dtype, device=store.device)
    values = torch.empty_like(keys)
    rows = store.rows(store.dtype.itemsize * w * c * 4)
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        t = tokens(x.read(r0, r1))
        keys[:, 0, r0 * w: r1 * w] = attn.to_k(t)
        values[:, 0, r0 * w: r1 * w] = attn.to_v(t)
    out = store.new((b, c, h, w))
    out.begin()
    rows = store.rows(store.dtype.itemsize * w * c * 6)  # band, queries, attention output, projection, residual sum
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        residual = x.read(r0, r1)
        query = attn.to_q(tokens(residual))[:, None]
        y = F.scaled_dot_product_attention(query, keys, values, dropout_p=0.0, is_causal=False)[:, 0]
        y = attn.to_out[1](attn.to_out[0](y.to(query.dtype)))
        y = y.transpose(1, 2).reshape(b, c, r1 - r0, w) + residual
        out.write(r0, y / attn.rescale_output_factor)
    del keys, values
    store.on_device -= kv_bytes
    x.free()
    return out


def _norm_act(norm: GroupNorm, act: nn.Module, x: _Map, store: _Store):
    """``act(norm(band))`` for bands of x, with the GroupNorm statistics of the whole map x. The scale and shift come
    from the module call (``return_scale_shift``), so that hooks on the module run before its weights are read."""
    probe = torch.empty(x.shape[0], x.shape[1], 1, 1, dtype=store.dtype, device=store.device)
    with _statistics_of([norm], lambda module, t: x.group_stats(module.num_groups)):
        scale, shift = norm(probe, return_scale_shift=True)
    return lambda band: _act_(act, torch.addcmul(shift, band, scale))


def _conv_pass(store: _Store, conv: nn.Module, x: _Map, out: _Map | None = None, *, pre=None, kind: str = "same",
               add=None, post=None) -> _Map:
    """``post(conv(pre(x)))`` (+ ``add(r0, r1)``, rows r0:r1 of a map to add) into ``out`` (default: a new map),
    streamed.

    Args:
        store (`_Store`): the store of the call.
        conv (`nn.Module`): the conv, called as a module on each band.
        x (`_Map`): the input map.
        out (`_Map`, *optional*): where to write; may be x itself (a 3×3 conv with as many channels out as in).
        pre (callable, *optional*): applied to each band of x before the conv (GroupNorm + activation).
        kind (`str`, defaults to ``"same"``): ``"same"``: 3×3 (or 1×1) stride-1 conv with its padding; ``"up"``:
            nearest ×2 upsampling then a 3×3 conv; ``"down"``: ``Downsample``'s stride-2 3×3 conv with LDM's
            asymmetric padding (one zero row and column after the map).
        add (callable, *optional*): rows of a map to add to the conv's output rows.
        post (callable, *optional*): applied to each band of the conv's output (a 1×1 conv).

    Each band reads its input rows with the halo the conv needs (one row each side; the conv's own zero padding is
    right at the map's border, and the output rows of a halo are dropped).
    """
    geometry = base_layer(conv)
    b, c_in, h, w = x.shape
    c_out, k = geometry.out_channels, geometry.kernel_size[0]
    halo = k // 2 if kind != "down" else 1
    size = {"same": (h, w), "up": (2 * h, 2 * w), "down": ((h - 2) // 2 + 1, (w - 2) // 2 + 1)}[kind]
    inplace = out is x
    if out is None:
        out = store.new((b, c_out, *size))
    out.begin()
    # bytes per output row of the band's tensors: input read (+ pre, + upsampled copy) and output (+ added map)
    item, w_out = store.dtype.itemsize, size[1]
    per_in_row = {"same": 1, "up": 0.5, "down": 2}[kind]
    per_row = item * (per_in_row * w * c_in * 2 + (w_out * c_in if kind == "up" else 0) + w_out * c_out * 3)
    rows = store.rows(per_row, halo=2 * halo)
    if kind == "up":
        rows = max(rows // 2, 1)  # iterate over input rows
    above = None  # inplace: pre(x) of the row above the band, kept before that row was overwritten
    step_out = {"same": 1, "up": 2, "down": 1}[kind]
    n_out = size[0] if kind == "down" else h
    for r0 in range(0, n_out, rows):
        r1 = min(r0 + rows, n_out)
        if kind == "down":  # output rows r0:r1 read input rows 2·r0 .. 2·r1 (+ one zero row below the map)
            band = x.read(2 * r0, min(2 * r1 + 1, h))
            band = pre(band) if pre is not None else band
            band = F.pad(band, (0, 1, 0, 2 * (r1 - r0) + 1 - band.shape[2]))
            y = conv(band)
        else:
            a, e = max(r0 - halo, 0), min(r1 + halo, h)
            if inplace:  # rows above r0 are overwritten already: the halo above comes from `above`
                band = pre(x.read(r0, e))
                band = band if above is None or halo == 0 else torch.cat([above, band], dim=2)
                above = band[:, :, band.shape[2] - (e - r1) - halo: band.shape[2] - (e - r1)].clone()
            else:
                band = x.read(a, e)
                band = pre(band) if pre is not None else band
            if kind == "up":  # the conv needs one upsampled row each side, not the two that one input row gives
                u0, u1 = max(2 * r0 - 1, 0), min(2 * r1 + 1, 2 * h)  # upsampled rows it reads
                band = nearest_2x(band)[:, :, u0 - 2 * a: u1 - 2 * a]
                y = conv(band)[:, :, 2 * r0 - u0: 2 * r1 - u0]
            else:
                y = conv(band)[:, :, r0 - a: r1 - a]
        if post is not None:
            y = post(y)
        if add is not None:
            y = y + add(step_out * r0, step_out * r1)
        out.write(step_out * r0, y)
    return out


def _pointwise_pass(store: _Store, out: _Map, band_of) -> None:
    """Rewrite ``out`` band by band with ``band_of(r0, r1)`` (a map the same size as out's rows r0:r1)."""
    b, c, h, w = out.shape
    rows = store.rows(store.dtype.itemsize * w * c * 4)
    out.begin()
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        out.write(r0, band_of(r0, r1))


@contextmanager
def _statistics_of(modules: list[nn.Module], hook):
    """Make ``modules`` (GroupNorms, squeeze-and-excitation gates) take their statistics from ``hook``."""
    for module in modules:
        module.stats_hook = hook
    try:
        yield
    finally:
        for module in modules:
            del module.stats_hook  # back to the class default (None): ordinary module


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
