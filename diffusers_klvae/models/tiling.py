"""Tiled encode/decode equal to the untiled network, at device memory bounded by a budget (``KLVAE.enable_tiling``).

diffusers' tiles each normalize with their own GroupNorm statistics, hence its seams. Here the network runs layer by
layer over *whole* maps held in a store (``tile_store``), streaming bands of rows through the device, and every
GroupNorm uses the exact moments of the whole map, merged while it was written: only the computation is cut into
pieces. How and why, with the memory and time figures: ``docs/tiling.md``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from .blocks import Downsample, GroupNorm, ResnetBlock, Upsample, act_inplace, base_layer, nearest_2x, upscale_dtype
from .encoder_decoder import is_hooked
from .tile_store import STORAGE_DTYPE, Map, MapStore, StreamedMoments
from .upsample_phases import PhaseForm, has_phase_form, upsample_conv

# Default budget: this many times the bytes of the largest map of one tile in the model's dtype. diffusers' tiled decode
# holds about four such maps at its peak, so the default bounds device memory as its tiles do.
DEVICE_TILES = 4
# Maps in host memory: at most this many times the largest map a resnet writes (which is held in any case); beyond,
# layers recompute rather than hold a second full-resolution map (``docs/tiling.md``).
HOST_MAPS = 1.5


def tiled_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """latents (B, latent_channels, h, w) → images (B, out_channels, h·f, w·f), the untiled decoder's result up to the
    rounding of the stored maps. Latents no larger than ``vae.tile_latent_min_size``, and
    calls with autograd on (gradients need every activation anyway), run the untiled decoder."""
    decoder = _check_unhooked(vae.decoder, "decoder")
    if max(z.shape[-2:]) <= vae.tile_latent_min_size or torch.is_grad_enabled():
        return decoder(z if vae.post_quant_conv is None else vae.post_quant_conv(z))
    layers = [layer for block in decoder.up_blocks for layer in block.layers()]
    up_dtype = upscale_dtype(decoder)  # as Decoder.forward: the mid block may run in another dtype (upcast_vae)
    store = _new_store(vae, z, up_dtype, layers, vae.tile_latent_min_size**2)
    # post_quant_conv (1×1) runs on conv_in's bands: not even the latents are transformed whole
    x = _conv_pass(store, decoder.conv_in, Map.wrap(store, z), pre=vae.post_quant_conv)
    x = _mid_block(store, decoder.mid_block, x)
    store.dtype = up_dtype  # bands are read in the store's dtype, not a weight's (layerwise casting: narrower)
    for layer in layers:
        x = _layer(store, layer, x)
    return _output(store, decoder, x)


def tiled_encode(vae, x: torch.Tensor) -> torch.Tensor:
    """images (B, in_channels, H, W) → moments (B, 2·latent_channels, H/f, W/f), the untiled encoder's result up to
    the rounding of the stored maps. Images no larger than ``vae.tile_sample_min_size``,
    and calls with autograd on, run the untiled encoder."""
    encoder = _check_unhooked(vae.encoder, "encoder")
    if max(x.shape[-2:]) <= vae.tile_sample_min_size or torch.is_grad_enabled():
        moments = encoder(x)
        return moments if vae.quant_conv is None else vae.quant_conv(moments)
    layers = [encoder.conv_in] + [layer for block in encoder.down_blocks for layer in block.layers()]
    store = _new_store(vae, x, x.dtype, layers, vae.tile_sample_min_size**2)
    h = _conv_pass(store, encoder.conv_in, Map.wrap(store, x))
    for layer in layers[1:]:
        h = _layer(store, layer, h)
    h = _mid_block(store, encoder.mid_block, h)
    # quant_conv (1×1) runs on conv_out's bands, written straight into the returned moments
    return _output(store, encoder, h, post=vae.quant_conv)


def _output(store: MapStore, part: nn.Module, x, post=None) -> torch.Tensor:
    """``post(part.conv_out(act(norm(x))))``, the encoder's or decoder's last layers, as a new tensor in the store's
    dtype (``post``: a 1×1 conv of each output band); x is freed."""
    b, _, h, w = x.shape
    channels = base_layer(post or part.conv_out).out_channels
    out = Map.wrap(store, torch.empty(b, channels, h, w, dtype=store.dtype, device=store.device))
    _statistics_pass(store, x)
    _conv_pass(store, part.conv_out, x, out, pre=_norm_act(part.conv_norm_out, part.conv_act, x, store), post=post)
    x.free()
    return out.tensor


def _check_unhooked(part: nn.Module, name: str) -> nn.Module:
    # Tiling calls the layers of the encoder/decoder one by one, never its forward: a hook there (block-level group
    # offloading loads the weights of conv_in, the mid block and conv_out in it) would not run.
    if is_hooked(part):
        raise ValueError(f"tiling runs the {name} layer by layer, past the hook on its forward (block-level group "
                         "offloading); use enable_group_offload(..., offload_type='leaf_level') with tiling")
    return part


def _new_store(vae, x: torch.Tensor, dtype: torch.dtype, layers: list[nn.Module], tile_pixels: int) -> MapStore:
    """The store of a tiled call on ``x``; default budget: ``DEVICE_TILES`` times the largest map of one tile."""
    storage = vae.tile_storage_dtype or (STORAGE_DTYPE if dtype == torch.float32 else dtype)
    budget = vae.tile_max_device_bytes
    if budget is None:
        budget = DEVICE_TILES * _map_sizes(layers, tile_pixels)[0] * dtype.itemsize
    resnet_out = _map_sizes(layers, x.shape[2] * x.shape[3])[1] * x.shape[0] * storage.itemsize
    return MapStore(x.device, x.dtype, storage, budget, kind=vae.tile_map_store, folder=vae.tile_map_dir,
                    host_cap=HOST_MAPS * resnet_out)


# ------------------------------------------------------------------ layers, streamed
class _Computed:
    """A map never stored: its rows are computed when read (an upsampler's ×2 output beyond host memory)."""

    def __init__(self, shape: tuple[int, ...], rows, sources: list, read_maps: float):
        self.shape, self.read, self.sources, self.moments = torch.Size(shape), rows, sources, None  # read(r0, r1)
        self.read_maps = read_maps  # temporaries of reading a row, in rows of this map (a stored map: 1)

    def free(self) -> None:
        for source in self.sources:
            source.free()


def _layer(store: MapStore, layer: nn.Module, x) -> Map | _Computed:
    """``layer(x)`` for a layer of the up/down blocks, as a new map (or a computed one); x is freed."""
    if isinstance(layer, ResnetBlock):
        return _resnet(store, layer, x)
    if isinstance(layer, Upsample):
        b, c, h, w = x.shape
        up = _Computed((b, base_layer(layer.conv).out_channels, 2 * h, 2 * w), _upsampled(store, layer.conv, x), [x],
                       read_maps=3)
        if not store.fits(up.shape):
            return up  # x is freed with it
        out = _sweep(store, store.new(tuple(up.shape)), up.read, per_row=(up.read_maps + 3) * store.row_bytes(up))
    else:  # Downsample
        out = _conv_pass(store, layer.conv, x, down=True)
    x.free()
    return out


def _upsampled(store: MapStore, conv: nn.Module, x):
    """``rows(r0, r1)``: rows r0:r1 of ``conv(nearest_2x(x))``, in the four-phase form (``upsample_phases``: 16/36
    of the multiply-adds, the same result up to float rounding) except for a wrapped conv (a PEFT adapter's extra
    terms would see x instead of the upsampled rows)."""
    b, _, h, w = x.shape
    if not has_phase_form(conv):
        def nearest(r0: int, r1: int) -> torch.Tensor:  # rows r0:r1 of x upsampled ×2
            a = r0 // 2
            return nearest_2x(x.read(a, (r1 + 1) // 2))[:, :, r0 - 2 * a: r1 - 2 * a]

        near = _Computed((b, x.shape[1], 2 * h, 2 * w), nearest, [], read_maps=1)
        return lambda r0, r1: _conv_rows(conv, near, r0, r1)
    phase_form = PhaseForm()

    def rows(r0: int, r1: int) -> torch.Tensor:
        a0, a1 = r0 // 2, (r1 + 1) // 2  # the input rows whose ×2 rows cover r0:r1, and one halo row each side
        lo, hi = max(a0 - 1, 0), min(a1 + 1, h)
        band = F.pad(x.read(lo, hi), (1, 1, 1 - (a0 - lo), 1 - (hi - a1)))  # zeros beyond the map: the conv's padding
        return upsample_conv(conv, band, phase_form)[:, :, r0 - 2 * a0: r1 - 2 * a0]

    return rows


def _conv_rows(conv: nn.Module, x, r0: int, r1: int, pre=None) -> torch.Tensor:
    """Rows r0:r1 of ``conv(pre(x))`` (stride 1, padding half the kernel), from the band with its halo rows."""
    halo = base_layer(conv).kernel_size[0] // 2
    a, e = max(r0 - halo, 0), min(r1 + halo, x.shape[2])
    band = x.read(a, e)
    return conv(band if pre is None else pre(band))[:, :, r0 - a: r1 - a]


def _resnet(store: MapStore, block: ResnetBlock, x) -> Map:
    """``block(x)``: conv1 writes h, conv2 writes over h and adds the shortcut (a gate: one more pass); x is freed.
    When host memory cannot hold h beside x (same channels, no gate), h is computed twice instead (statistics, then
    the output written over x)."""
    _statistics_pass(store, x)
    b, _, h_rows, w = x.shape
    c_out = base_layer(block.conv1).out_channels
    pre1 = _norm_act(block.norm1, block.nonlinearity, x, store)
    if (isinstance(x, Map) and block.conv_shortcut is None and block.squeeze_excitation is None
            and not store.fits((b, c_out, h_rows, w))):
        h = _Computed((b, c_out, h_rows, w), lambda r0, r1: _conv_rows(block.conv1, x, r0, r1, pre1), [], read_maps=3)
        _statistics_pass(store, h)
        pre2 = _norm_act(block.norm2, block.nonlinearity, h, store)

        def band(r0: int, r1: int) -> torch.Tensor:  # reads rows r0 - 2 .. r1 + 2 of x, which it overwrites
            return _conv_rows(block.conv2, h, r0, r1, pre2).add_(x.read(r0, r1))

        return _sweep(store, x, band, per_row=9 * store.row_bytes(x), halo=2, lag=2)
    h = _conv_pass(store, block.conv1, x, pre=pre1)
    pre2 = _norm_act(block.norm2, block.nonlinearity, h, store)
    shortcut = None if block.squeeze_excitation is not None else _shortcut(block, x)
    _conv_pass(store, block.conv2, h, h, pre=pre2, add=shortcut, add_row=x.read_maps * store.row_bytes(x))
    if block.squeeze_excitation is not None:  # the gate needs the whole-map mean of conv2's output: one more pass
        _sweep(store, h, _gate(block, h, x), per_row=4 * store.row_bytes(h))
    x.free()
    return h


def _shortcut(block: ResnetBlock, x):
    """Rows r0:r1 of the block's shortcut of x."""
    return x.read if block.conv_shortcut is None else lambda r0, r1: block.conv_shortcut(x.read(r0, r1))


def _gate(block: ResnetBlock, h: Map, x):
    """Band r0:r1 of ``gate(h) + shortcut(x)``, the gate pooling with the whole-map mean of h."""
    gate, shortcut = block.squeeze_excitation, _shortcut(block, x)
    stats = h.moments.channel_stats()  # now: the pass that rewrites h restarts its moments

    def band(r0: int, r1: int) -> torch.Tensor:
        with _statistics_of([gate], lambda module, t: stats):
            return gate(h.read(r0, r1)).add_(shortcut(r0, r1))

    return band


def _mid_block(store: MapStore, mid, x: Map) -> Map:
    """resnet → attention over the whole map → resnet; x is freed."""
    x = _resnet(store, mid.resnets[0], x)
    for attention in mid.attentions:
        x = _attention(store, attention, x)
    return _resnet(store, mid.resnets[1], x)


def _attention(store: MapStore, attn, x: Map) -> Map:
    """``attn(x)`` (single-head self-attention with residual); x is freed. With ``AttnProcessor2_0`` (known to us),
    the keys and values of the whole map are held on the device (counted against the budget while they live, allowed
    beyond it) and each band of queries attends to them; any other processor gets the whole map, as untiled."""
    b, c, h, w = x.shape
    if type(attn.processor) is not AttnProcessor2_0 or attn.heads != 1:
        y = attn(x.read(0, h))
        x.free()
        out = store.new(tuple(y.shape))
        return _sweep(store, out, lambda r0, r1: y[:, :, r0:r1].clone(), per_row=2 * store.row_bytes(out))
    scale, shift = _scale_shift(attn.group_norm, x, store)

    def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, rows, W) → normalized (B, rows·W, C)
        return torch.addcmul(shift, t, scale).flatten(2).transpose(1, 2)

    kv_bytes = 2 * b * h * w * c * store.dtype.itemsize
    store.on_device += kv_bytes
    kv = torch.empty(2, b, 1, h * w, c, dtype=store.dtype, device=store.device)  # keys, values
    rows = store.rows(store.dtype.itemsize * w * c * 4)
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        t = tokens(x.read(r0, r1))
        kv[0, :, 0, r0 * w: r1 * w] = attn.to_k(t)
        kv[1, :, 0, r0 * w: r1 * w] = attn.to_v(t)

    def band(r0: int, r1: int) -> torch.Tensor:
        residual = x.read(r0, r1)
        query = attn.to_q(tokens(residual))[:, None]
        y = F.scaled_dot_product_attention(query, kv[0], kv[1], dropout_p=0.0, is_causal=False)[:, 0]
        y = attn.to_out[1](attn.to_out[0](y.to(query.dtype)))
        return (y.transpose(1, 2).reshape(b, c, r1 - r0, w) + residual).div_(attn.rescale_output_factor)

    # band, queries, attention output, projection, residual sum
    out = store.new((b, c, h, w))
    _sweep(store, out, band, per_row=6 * store.row_bytes(out))
    kv = None  # the keys and values go before the next layer allocates
    store.on_device -= kv_bytes
    x.free()
    return out


def _scale_shift(norm: GroupNorm, x, store: MapStore) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (B, C, 1, 1), with ``norm(band) == band * scale + shift`` under the GroupNorm statistics of
    the whole map x; from the module call (``return_scale_shift``), so that hooks run before its weights are read."""
    probe = torch.empty(x.shape[0], x.shape[1], 1, 1, dtype=store.dtype, device=store.device)
    with _statistics_of([norm], lambda module, t: x.moments.group_stats(module.num_groups)):
        return norm(probe, return_scale_shift=True)


def _norm_act(norm: GroupNorm, act: nn.Module, x, store: MapStore):
    """``act(norm(band))`` for bands of x, with the GroupNorm statistics of the whole map x."""
    scale, shift = _scale_shift(norm, x, store)
    return lambda band: act_inplace(act, band.mul_(scale).add_(shift))  # in place: bands read from a map are new tensors


def _sweep(store: MapStore, out: Map, band_of, *, per_row: float, halo: int = 0, lag: int = 0) -> Map:
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


def _statistics_pass(store: MapStore, x) -> None:
    """Fill the moments of a computed map (a stored one has them from its writing pass)."""
    if x.moments is None and isinstance(x, _Computed):
        x.moments = StreamedMoments()
        rows = store.rows((x.read_maps + 1) * store.row_bytes(x), halo=2)
        for r0 in range(0, x.shape[2], rows):
            x.moments.add(x.read(r0, min(r0 + rows, x.shape[2])))


def _conv_pass(store: MapStore, conv: nn.Module, x, out: Map | None = None, *, pre=None, down: bool = False,
               add=None, add_row: int = 0, post=None) -> Map:
    """``post(conv(pre(x))) + add(r0, r1)`` into ``out`` (default: a new map; may be x itself), streamed: ``pre`` a
    GroupNorm + activation (or a 1×1 conv) of each input band, ``post`` a 1×1 conv of each output band, ``add`` rows
    r0:r1 of a map to add (its temporaries take ``add_row`` bytes per row); ``down``: ``Downsample``'s stride-2 conv
    with LDM's asymmetric padding (one zero row and column after the map), else a stride-1 conv with its own padding."""
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
    per_row = (2 if down else 1) * (x.read_maps + 1) * store.row_bytes(x) + 4 * store.row_bytes(out) + add_row
    return _sweep(store, out, band, per_row=per_row, halo=1, lag=1 if out is x else 0)


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
    """Values per sample of the largest map ``layers`` read or write, and of the largest a resnet writes."""
    largest = resnet_out = 0
    for layer in layers:
        conv = layer.conv1 if isinstance(layer, ResnetBlock) else getattr(layer, "conv", layer)  # up/down: .conv
        conv = base_layer(conv)  # a PEFT adapter wraps the conv
        if isinstance(layer, Upsample):
            pixels *= 4
        largest = max(largest, max(conv.in_channels, conv.out_channels) * pixels)
        if isinstance(layer, ResnetBlock):
            resnet_out = max(resnet_out, conv.out_channels * pixels)
        if isinstance(layer, Downsample):
            pixels //= 4
    return largest, resnet_out
