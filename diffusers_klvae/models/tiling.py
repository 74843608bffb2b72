"""Tiled encode/decode equal to the untiled network, at device memory bounded by a budget.

Per-tile GroupNorm statistics are what give diffusers' tiled VAE its seams: every tile normalizes with its own mean
and variance, so neighbouring tiles disagree and a narrow blend cannot hide it. Here there are no tiles to disagree:
the network runs layer by layer over *whole* maps, and only the computation is cut into pieces.

- Every map between two layers lives whole in a store (``_Store``): on the compute device while the maps held there
  fit ``MAP_SHARE`` of the budget, otherwise in host memory (pinned for CUDA), or with ``map_store="file"`` in an
  unlinked temporary file read and written a band at a time (its pages are in the page cache, not in the process).
- A layer streams bands of full rows through the device, each with the halo rows its convs need, and writes its
  output bands into a new map (or over its input, a few rows behind the band that reads it). The band height keeps
  the band's temporaries within what the maps on the device leave of the budget.
- GroupNorm statistics (and squeeze-and-excitation means) are exact: while a map is written, the moments of every
  band are merged (Chan's formula, float64) into whole-map moments, which the next GroupNorm uses for every band.
- Host memory holds at most ``HOST_MAPS`` times the largest map a resnet writes (the residual stream, held anyway).
  Beyond that a layer recomputes instead of storing: an upsampler's ×2 map is computed from its input wherever it is
  read, and a resnet runs its first conv twice (once for its second GroupNorm's statistics) and writes its output
  over its input. A file store holds every map.
- The mid-block attention holds the keys and values of the whole latent map on the device and streams query bands.

The only difference from the untiled network is the rounding of the stored maps: a float32 model stores them in
float16 with a power-of-two scale per row and channel by default (``storage_dtype=torch.float32`` stores them
exactly, ``torch.bfloat16`` without scales). The budget does not cover the weights, the returned output, the
caller's input, or the attention's keys and values; a band is at least one row, whatever its bytes. Statistics reach
the GroupNorms through their ``stats_hook`` (``_statistics_of``), so every GroupNorm and conv runs as a module call
(hooks of layerwise casting, group offloading and PEFT adapters run as untiled). Figures: ``docs/tiling.md``.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from .blocks import (Downsample, GroupNorm, ResnetBlock, Upsample, _act_, base_layer, computing_in, merge_moments,
                     nearest_2x, upscale_dtype)

# Default budget: this many times the bytes of the largest map of one tile in the model's dtype. diffusers' tiled decode
# holds about four such maps at its peak, so the default bounds device memory as its tiles do.
DEVICE_TILES = 4
# Of the budget, whole maps may take this share on the device; the rest is for the bands being computed.
MAP_SHARE = 0.75
# Maps in host memory: at most this many times the largest map a resnet writes (which is held in any case); beyond,
# layers recompute rather than hold a second full-resolution map (see the module docstring).
HOST_MAPS = 1.5
# The bytes of a band's tensors that the row estimate counts, times this, must fit: convolution kernels reorder and pad
# their inputs in workspaces the estimate does not see.
WORKSPACE_FACTOR = 1.5
# Maps of a float32 model by default: half the memory. float16 with a power-of-two scale per row and channel
# (``_Map``): ~18 dB closer to untiled than bfloat16, and no overflow.
STORAGE_DTYPE = torch.float16
SCALED_MAX_EXPONENT = 15  # scaled rows stay below 2**15 < 65504, float16's largest value
MAP_STORES = ("memory", "file")


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
        _statistics_pass(store, x)
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
    """Where the whole maps of one tiled call live, and how many rows a band may have: ``budget`` bytes of the
    ``device`` for the maps held there and the bands (computed in ``dtype``, stored in ``storage``); beyond, maps go to
    ``kind`` (``"memory"``: host memory, pinned for CUDA, up to ``host_cap`` bytes before layers recompute instead;
    ``"file"``: temporary files in ``folder``)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, storage: torch.dtype, budget: int, *,
                 kind: str = "memory", folder: str | None = None, host_cap: float = math.inf):
        if kind not in MAP_STORES:
            raise ValueError(f"map_store must be one of {MAP_STORES}; got {kind!r}")
        self.device, self.dtype, self.storage, self.budget = device, dtype, storage, int(budget)
        self.kind, self.folder, self.host_cap = kind, folder, host_cap
        self.on_device = 0  # bytes of the whole maps held on the device now
        self.in_host = 0  # bytes of the whole maps held in host memory now

    @classmethod
    def for_call(cls, vae, x: torch.Tensor, dtype: torch.dtype, layers: list[nn.Module], tile_pixels: int) -> "_Store":
        """The store of a tiled call on ``x``, with the model's tiling settings; the default budget is ``DEVICE_TILES``
        times the largest map of one tile of ``tile_pixels`` input pixels through ``layers``, in ``dtype``."""
        storage = getattr(vae, "tile_storage_dtype", None) or (STORAGE_DTYPE if dtype == torch.float32 else dtype)
        budget = getattr(vae, "tile_max_device_bytes", None)
        if budget is None:
            budget = DEVICE_TILES * _map_sizes(layers, tile_pixels)[0] * dtype.itemsize
        resnet_out = _map_sizes(layers, x.shape[2] * x.shape[3])[1] * x.shape[0] * storage.itemsize
        return cls(x.device, x.dtype, storage, budget, kind=getattr(vae, "tile_map_store", None) or "memory",
                   folder=getattr(vae, "tile_map_dir", None), host_cap=HOST_MAPS * resnet_out)

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether one more map of ``shape`` may be held beside those held now (in a file, always)."""
        nbytes = math.prod(shape) * self.storage.itemsize
        return (self.on_device + nbytes <= MAP_SHARE * self.budget or self.kind == "file"
                or self.in_host + nbytes <= self.host_cap)

    def new(self, shape: tuple[int, ...]) -> "_Map":
        """An empty map of ``shape`` (B, C, H, W): on the device while the maps there fit ``MAP_SHARE`` of the budget."""
        nbytes = math.prod(shape) * self.storage.itemsize
        if self.on_device + nbytes <= MAP_SHARE * self.budget:
            self.on_device += nbytes
            return _Map(self, torch.empty(shape, dtype=self.storage, device=self.device), counted=nbytes)
        if self.kind == "file":
            return _FileMap(self, shape)
        pin = self.device.type == "cuda"  # pinned host memory: faster copies to and from the device
        self.in_host += nbytes
        return _Map(self, torch.empty(shape, dtype=self.storage, pin_memory=pin), in_host=nbytes)

    def rows(self, per_row: float, halo: float = 0) -> int:
        """Rows of a band whose tensors take ``per_row`` bytes per row (plus ``halo`` rows), within what the maps on the
        device leave of the budget; at least one."""
        free = self.budget - self.on_device
        return max(1, int(free / (WORKSPACE_FACTOR * per_row)) - math.ceil(halo))


class _Moments:
    """Whole-map per-channel moments merged band by band (count per channel, mean and M2 in float64, each (B, C))."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, band: torch.Tensor) -> None:
        wide = band if band.dtype in (torch.float32, torch.float64) else band.float()  # half: float32 moments
        var, mean = torch.var_mean(wide, dim=(2, 3), correction=0)
        count = band.shape[2] * band.shape[3]
        part = (count, mean.double(), var.double() * count)
        self.n, self.mean, self.m2 = part if self.mean is None else merge_moments((self.n, self.mean, self.m2), part)

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, biased var) of the whole map, each (B, C) float64."""
        return self.mean, self.m2 / self.n

    def group_stats(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (mean, biased var) of the whole map, each (B, groups) float64 (every channel has n values)."""
        b = self.mean.shape[0]
        mean_c, m2_c = self.mean.view(b, groups, -1), self.m2.view(b, groups, -1)
        mean_g = mean_c.mean(-1)
        m2_g = m2_c.sum(-1) + self.n * (mean_c - mean_g[..., None]).square().sum(-1)
        return mean_g, m2_g / (self.n * mean_c.shape[-1])


class _Map:
    """A whole map (B, C, H, W) held as a tensor (on the device or in host memory), read and written in bands of rows.

    While a pass writes it, the per-channel moments of the bands written are merged into ``moments`` (``_Moments``):
    the GroupNorm statistics of the next layer.

    Stored in float16 for a wider compute dtype, every row of every channel is scaled by a power of two that brings its
    largest magnitude just under 2¹⁵ (``exponents``, (B, C, H) int32 on the device): float16's 11-bit precision
    without its range limit (the SD VAE's activations overflow float16), 8× finer than bfloat16 in the same bytes.
    """

    def __init__(self, store: _Store, tensor: torch.Tensor | None, *, counted: int = 0, in_host: int = 0,
                 track: bool = True, shape: tuple[int, ...] | None = None):
        self.store, self.tensor, self.counted, self.in_host, self.track = store, tensor, counted, in_host, track
        self.on_device = counted > 0  # held on the device within the budget (else in host memory or a file)
        self.moments, self.read_maps = None, 1
        self.shape = torch.Size(shape if shape is not None else tensor.shape)
        scaled = track and store.storage == torch.float16 and store.dtype != torch.float16
        b, c, h, _ = self.shape
        self.exponents = torch.zeros(b, c, h, dtype=torch.int32, device=store.device) if scaled else None
        if scaled:  # on the device whatever the store: counted in the budget (2/W of the map's bytes)
            store.on_device += self.exponents.nbytes
            self.counted += self.exponents.nbytes

    @classmethod
    def wrap(cls, store: _Store, tensor: torch.Tensor) -> "_Map":
        """A map over a tensor the caller owns (the input, the returned output): not counted in the budget, stored as
        it is, and no layer normalizes it (no moments)."""
        return cls(store, tensor, track=False)

    def _get(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 as stored, (B, C, rows, W) (a view of the tensor)."""
        return self.tensor[:, :, r0:r1]

    def _put(self, r0: int, band: torch.Tensor) -> None:
        """Store ``band`` (compute dtype, on the compute device) at rows r0.. in the storage dtype."""
        self.tensor[:, :, r0: r0 + band.shape[2]].copy_(band)

    def read(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 on the compute device in the compute dtype (a view when the map is stored that way: callers
        must not write into it)."""
        band = self._get(r0, r1).to(self.store.device, self.store.dtype, memory_format=torch.contiguous_format)
        if self.exponents is None:
            return band
        scale = torch.exp2((self.exponents[:, :, r0:r1] - SCALED_MAX_EXPONENT).to(self.store.dtype))
        return band.mul_(scale[..., None])  # a power of two: exact

    def begin(self) -> None:
        """Start a pass writing the map: its moments restart from nothing."""
        self.moments = _Moments() if self.track else None

    def write(self, r0: int, band: torch.Tensor) -> None:
        """Store the computed ``band`` at rows r0.., and merge its moments (of the computed values, before the
        storage rounding: what the untiled network normalizes). A scaled map scales ``band`` in place: callers pass
        their own temporaries."""
        if self.moments is not None:
            self.moments.add(band)
        if self.exponents is not None:  # |band| < 2**exponent per row and channel → |scaled| < 2**SCALED_MAX_EXPONENT
            low, high = torch.aminmax(band, dim=3)  # no full-size temporary, unlike band.abs()
            exponent = torch.frexp(torch.maximum(-low, high)).exponent
            self.exponents[:, :, r0: r0 + band.shape[2]] = exponent
            band.mul_(torch.exp2((SCALED_MAX_EXPONENT - exponent).to(band.dtype))[..., None])
        self._put(r0, band)

    def free(self) -> None:
        """Release the map (its bytes return to the budget and the host cap)."""
        self.store.on_device -= self.counted
        self.store.in_host -= self.in_host
        self.counted, self.in_host, self.tensor, self.exponents = 0, 0, None, None


class _FileMap(_Map):
    """A map in an unlinked temporary file, laid out (H, B, C, W) so that a band of rows is one byte range, read and
    written with one ``preadv``/``pwrite`` per band: its pages are in the kernel's page cache (written back to disk
    when memory is short), never in the process, and no page is faulted in one at a time."""

    def __init__(self, store: _Store, shape: tuple[int, ...]):
        super().__init__(store, None, shape=shape)
        b, c, h, w = shape
        self.row_bytes = b * c * w * store.storage.itemsize
        fd, path = tempfile.mkstemp(prefix="klvae-map-", suffix=".bin", dir=store.folder)
        os.unlink(path)  # the descriptor keeps the file until freed
        self.fd, self._close = fd, weakref.finalize(self, os.close, fd)  # closed by free(), or when collected

    def _get(self, r0: int, r1: int) -> torch.Tensor:
        b, c, _, w = self.shape
        rows = torch.empty(r1 - r0, b, c, w, dtype=self.store.storage)
        view, offset = memoryview(rows.view(torch.uint8).numpy()).cast("B"), r0 * self.row_bytes
        while view:  # a regular file reads short only past 2 GiB per call
            done = os.preadv(self.fd, [view], offset)
            view, offset = view[done:], offset + done
        return rows.permute(1, 2, 0, 3)

    def _put(self, r0: int, band: torch.Tensor) -> None:
        rows = torch.empty(band.shape[2], *band.shape[:2], band.shape[3], dtype=self.store.storage)
        rows.copy_(band.permute(2, 0, 1, 3))
        view, offset = memoryview(rows.view(torch.uint8).numpy()).cast("B"), r0 * self.row_bytes
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def free(self) -> None:
        super().free()
        self._close()


class _Computed:
    """A map that is never stored: its rows are computed from other maps wherever they are read (an upsampler's ×2
    output when host memory cannot hold it). ``moments`` as ``_Map``'s, filled by ``_statistics_pass``."""

    def __init__(self, shape: tuple[int, ...], rows, sources: list, read_maps: float):
        self.shape, self.rows, self.sources, self.moments = torch.Size(shape), rows, sources, None
        self.read_maps = read_maps  # temporaries of reading a row, in rows of this map (a stored map: 1)

    def read(self, r0: int, r1: int) -> torch.Tensor:
        return self.rows(r0, r1)

    def free(self) -> None:
        for source in self.sources:
            source.free()


# ------------------------------------------------------------------ layers, streamed
def _layer(store: _Store, layer: nn.Module, x) -> _Map | _Computed:
    """``layer(x)`` for a layer of the up/down blocks, as a new map (or a computed one); x is freed."""
    if isinstance(layer, ResnetBlock):
        return _resnet(store, layer, x)
    if isinstance(layer, Upsample):
        b, c, h, w = x.shape
        near = _nearest(x)
        up = _Computed((b, base_layer(layer.conv).out_channels, 2 * h, 2 * w),
                       lambda r0, r1: _conv_rows(layer.conv, near, r0, r1), [x], read_maps=3)
        if not store.fits(up.shape):
            return up  # x is freed with it
        out = _sweep(store, store.new(tuple(up.shape)), up.read, per_row=(up.read_maps + 3) * _row_bytes(store, up))
    elif isinstance(layer, Downsample):
        out = _conv_pass(store, layer.conv, x, down=True)
    else:
        raise TypeError(f"expected a ResnetBlock, Upsample or Downsample layer; got {type(layer).__name__}")
    x.free()
    return out


def _nearest(x):
    """x upsampled ×2 (nearest), as a map computed when read."""
    b, c, h, w = x.shape

    def rows(r0: int, r1: int) -> torch.Tensor:
        a = r0 // 2
        return nearest_2x(x.read(a, (r1 + 1) // 2))[:, :, r0 - 2 * a: r1 - 2 * a]

    return _Computed((b, c, 2 * h, 2 * w), rows, [x], read_maps=1)


def _conv_rows(conv: nn.Module, x, r0: int, r1: int, pre=None) -> torch.Tensor:
    """Rows r0:r1 of ``conv(pre(x))`` for a stride-1 conv padding as much as its kernel's half: reads the halo rows
    each side (the conv's own zero padding is right at the map's border; the output rows of a halo are dropped)."""
    halo = base_layer(conv).kernel_size[0] // 2
    a, e = max(r0 - halo, 0), min(r1 + halo, x.shape[2])
    band = x.read(a, e)
    return conv(band if pre is None else pre(band))[:, :, r0 - a: r1 - a]


def _resnet(store: _Store, block: ResnetBlock, x) -> _Map:
    """``block(x)`` in two passes (three with a squeeze-and-excitation gate); x is freed.

    conv1 writes a new map h; conv2 writes over h (a few rows behind its reads) and adds the shortcut of x band by
    band: two maps at a time, as the untiled inference path. When host memory cannot hold h beside x (same channels,
    no gate), conv1 runs twice instead: a sweep for the statistics of h, then one that computes h band by band (with
    its halo) and writes the block's output over x."""
    _statistics_pass(store, x)
    b, _, h_rows, w = x.shape
    c_out = base_layer(block.conv1).out_channels
    pre1 = _norm_act(block.norm1, block.nonlinearity, x, store)
    if (isinstance(x, _Map) and block.conv_shortcut is None and block.squeeze_excitation is None
            and not store.fits((b, c_out, h_rows, w))):
        h = _Computed((b, c_out, h_rows, w), lambda r0, r1: _conv_rows(block.conv1, x, r0, r1, pre1), [], read_maps=3)
        _statistics_pass(store, h)
        pre2 = _norm_act(block.norm2, block.nonlinearity, h, store)

        def band(r0: int, r1: int) -> torch.Tensor:  # reads rows r0 - 2 .. r1 + 2 of x, which it overwrites
            return _conv_rows(block.conv2, h, r0, r1, pre2).add_(x.read(r0, r1))

        return _sweep(store, x, band, per_row=9 * _row_bytes(store, x), halo=2, lag=2)
    h = _conv_pass(store, block.conv1, x, pre=pre1)
    pre2 = _norm_act(block.norm2, block.nonlinearity, h, store)
    shortcut = None if block.squeeze_excitation is not None else _shortcut(block, x)
    _conv_pass(store, block.conv2, h, h, pre=pre2, add=shortcut, add_row=x.read_maps * _row_bytes(store, x))
    if block.squeeze_excitation is not None:  # the gate needs the whole-map mean of conv2's output: one more pass
        _sweep(store, h, _gate(block, h, x), per_row=4 * _row_bytes(store, h))
    x.free()
    return h


def _shortcut(block: ResnetBlock, x):
    """Rows r0:r1 of the block's shortcut of x."""
    if block.conv_shortcut is None:
        return lambda r0, r1: x.read(r0, r1)
    return lambda r0, r1: block.conv_shortcut(x.read(r0, r1))


def _gate(block: ResnetBlock, h: _Map, x):
    """Band r0:r1 of ``gate(h) + shortcut(x)``, the gate pooling with the whole-map mean of h."""
    gate, shortcut = block.squeeze_excitation, _shortcut(block, x)
    stats = h.moments.channel_stats()  # now: the pass that rewrites h restarts its moments

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
    of the whole map are computed band by band and held on the device (counted against the budget while they live,
    allowed beyond it), then each band of queries attends to all of them. Any other processor (a custom one,
    ``FusedAttnProcessor2_0``) gets the whole map on the device, as untiled."""
    b, c, h, w = x.shape
    if type(attn.processor) is not AttnProcessor2_0 or attn.heads != 1:
        y = attn(x.read(0, h))
        x.free()
        out = store.new(tuple(y.shape))
        return _sweep(store, out, lambda r0, r1: y[:, :, r0:r1].clone(), per_row=2 * _row_bytes(store, out))
    probe = torch.empty(b, c, 1, 1, dtype=store.dtype, device=store.device)
    with _statistics_of([attn.group_norm], lambda module, t: x.moments.group_stats(module.num_groups)):
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

    def band(r0: int, r1: int) -> torch.Tensor:
        residual = x.read(r0, r1)
        query = attn.to_q(tokens(residual))[:, None]
        y = F.scaled_dot_product_attention(query, keys, values, dropout_p=0.0, is_causal=False)[:, 0]
        y = attn.to_out[1](attn.to_out[0](y.to(query.dtype)))
        return (y.transpose(1, 2).reshape(b, c, r1 - r0, w) + residual).div_(attn.rescale_output_factor)

    # band, queries, attention output, projection, residual sum
    out = store.new((b, c, h, w))
    _sweep(store, out, band, per_row=6 * _row_bytes(store, out))
    del keys, values
    store.on_device -= kv_bytes
    x.free()
    return out


def _norm_act(norm: GroupNorm, act: nn.Module, x, store: _Store):
    """``act(norm(band))`` for bands of x, with the GroupNorm statistics of the whole map x. The scale and shift come
    from the module call (``return_scale_shift``), so that hooks on the module run before its weights are read."""
    probe = torch.empty(x.shape[0], x.shape[1], 1, 1, dtype=store.dtype, device=store.device)
    with _statistics_of([norm], lambda module, t: x.moments.group_stats(module.num_groups)):
        scale, shift = norm(probe, return_scale_shift=True)
    return lambda band: _act_(act, torch.addcmul(shift, band, scale))


def _sweep(store: _Store, out: _Map, band_of, *, per_row: float, halo: int = 0, lag: int = 0) -> _Map:
    """Write ``band_of(r0, r1)`` (rows r0:r1 of the result) into ``out`` band by band, merging its moments. A band's
    temporaries take ``per_row`` bytes per output row, plus ``halo`` input rows each side. With ``lag`` (out is also
    read, ``lag`` rows around each band), a band is written only once no later band reads its rows."""
    b, c, h, w = out.shape
    rows = store.rows(per_row, halo=2 * halo)
    out.begin()
    pending = []
    for r0 in range(0, h, rows):
        while pending and pending[0][0] + pending[0][1].shape[2] <= r0 - lag:
            out.write(*pending.pop(0))
        pending.append((r0, band_of(r0, min(r0 + rows, h))))
        if not lag:
            out.write(*pending.pop())
    for part in pending:
        out.write(*part)
    return out


def _statistics_pass(store: _Store, x) -> None:
    """Fill the moments of a computed map (a stored one has them from its writing pass)."""
    if x.moments is None and isinstance(x, _Computed):
        x.moments = _Moments()
        rows = store.rows((x.read_maps + 1) * _row_bytes(store, x), halo=2)
        for r0 in range(0, x.shape[2], rows):
            x.moments.add(x.read(r0, min(r0 + rows, x.shape[2])))


def _conv_pass(store: _Store, conv: nn.Module, x, out: _Map | None = None, *, pre=None, down: bool = False,
               add=None, add_row: int = 0, post=None) -> _Map:
    """``post(conv(pre(x))) + add(r0, r1)`` into ``out`` (default: a new map; may be x itself), streamed: ``pre`` a
    GroupNorm + activation (or a 1×1 conv) of each input band, ``post`` a 1×1 conv of each output band, ``add`` rows
    r0:r1 of a map to add (its temporaries take ``add_row`` bytes per row); ``down``: ``Downsample``'s stride-2 conv with LDM's asymmetric padding (one zero row and
    column after the map), else a stride-1 conv with its own padding."""
    b, c_in, h, w = x.shape
    c_out = base_layer(conv).out_channels
    size = ((h - 2) // 2 + 1, (w - 2) // 2 + 1) if down else (h, w)
    if out is None:
        out = store.new((b, c_out, *size))

    def band(r0: int, r1: int) -> torch.Tensor:
        if down:  # output rows r0:r1 read input rows 2·r0 .. 2·r1 (+ one zero row below the map)
            t = x.read(2 * r0, min(2 * r1 + 1, h))
            t = pre(t) if pre is not None else t
            y = conv(F.pad(t, (0, 1, 0, 2 * (r1 - r0) + 1 - t.shape[2])))
        else:
            y = _conv_rows(conv, x, r0, r1, pre)
        y = post(y) if post is not None else y
        return y if add is None else y.add_(add(r0, r1))

    # per output row: input read and pre(input) (two input rows when down), the conv's output, the added map, a
    # pending band and a spare
    per_row = (2 if down else 1) * (x.read_maps + 1) * _row_bytes(store, x) + 4 * _row_bytes(store, out) + add_row
    return _sweep(store, out, band, per_row=per_row, halo=1, lag=1 if out is x else 0)


def _row_bytes(store: _Store, x) -> int:
    """Bytes of one row of x in the compute dtype."""
    return store.dtype.itemsize * x.shape[0] * x.shape[1] * x.shape[3]


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


def _map_sizes(layers: list[nn.Module], pixels: int) -> tuple[int, int]:
    """Values (per sample) of the largest map any of ``layers`` reads or writes, and of the largest a resnet writes,
    for an input of ``pixels``."""
    largest = resnet_out = 0
    for layer in layers:
        conv = layer.conv1 if isinstance(layer, ResnetBlock) else layer.conv if isinstance(layer, (Upsample, Downsample)) else layer
        conv = base_layer(conv)  # a PEFT adapter wraps the conv
        if isinstance(layer, Upsample):
            pixels *= 4
        largest = max(largest, max(conv.in_channels, conv.out_channels) * pixels)
        if isinstance(layer, ResnetBlock):
            resnet_out = max(resnet_out, conv.out_channels * pixels)
        if isinstance(layer, Downsample):
            pixels //= 4
    return largest, resnet_out
