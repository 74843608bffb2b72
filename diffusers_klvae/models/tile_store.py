"""Where the whole maps of a tiled call live (``tiling.py``): a store with a device budget (``MapStore``), maps read
and written in bands of rows (``Map``; ``FileMap`` in a temporary file), and the whole-map moments merged while a
map is written (``StreamedMoments``: its next GroupNorm's exact statistics).
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref

import torch

from .blocks import group_moments, merge_moments

# Of the budget, whole maps may take this share on the device; the rest is for the bands being computed.
MAP_SHARE = 0.75
# The bytes of a band's tensors that the row estimate counts, times this, must fit: convolution kernels reorder and pad
# their inputs in workspaces the estimate does not see.
WORKSPACE_FACTOR = 1.5
# Maps of a float32 model by default: half the memory. float16 with a power-of-two scale per row and channel
# (``Map``): ~18 dB closer to untiled than bfloat16, and no overflow.
STORAGE_DTYPE = torch.float16
SCALED_MAX_EXPONENT = 15  # scaled rows stay below 2**15 < 65504, float16's largest value
# Moments are taken over chunks of about this many values: the centred copy of a chunk is a small temporary (a band-
# sized one costs a page fault per 4 kB page on CPU; torch.var_mean is ~10x slower than these sums).
MOMENT_CHUNK = 2**18


class MapStore:
    """Where the whole maps of one tiled call live, and how many rows a band may have: ``budget`` bytes of the
    ``device`` for the maps held there and the bands (computed in ``dtype``, stored in ``storage``); beyond, maps go to
    ``kind`` (``"memory"``: host memory, pinned for CUDA, up to ``host_cap`` bytes before layers recompute instead;
    ``"file"``: temporary files in ``folder``)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, storage: torch.dtype, budget: int, *,
                 kind: str = "memory", folder: str | None = None, host_cap: float = math.inf):
        self.device, self.dtype, self.storage, self.budget = device, dtype, storage, int(budget)
        self.kind, self.folder, self.host_cap = kind, folder, host_cap
        self.on_device = 0  # bytes of the whole maps held on the device now
        self.in_host = 0  # bytes of the whole maps held in host memory now

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether one more map of ``shape`` may be held beside those held now (in a file, always)."""
        nbytes = math.prod(shape) * self.storage.itemsize
        return (self.on_device + nbytes <= MAP_SHARE * self.budget or self.kind == "file"
                or self.in_host + nbytes <= self.host_cap)

    def new(self, shape: tuple[int, ...]) -> "Map":
        """An empty map of ``shape`` (B, C, H, W): on the device while the maps there fit ``MAP_SHARE`` of the budget."""
        nbytes = math.prod(shape) * self.storage.itemsize
        if self.on_device + nbytes <= MAP_SHARE * self.budget:
            self.on_device += nbytes
            return Map(self, torch.empty(shape, dtype=self.storage, device=self.device), counted=nbytes)
        if self.kind == "file":
            return FileMap(self, shape)
        pin = self.device.type == "cuda"  # pinned host memory: faster copies to and from the device
        self.in_host += nbytes
        return Map(self, torch.empty(shape, dtype=self.storage, pin_memory=pin), in_host=nbytes)

    def rows(self, per_row: float, halo: float = 0) -> int:
        """Rows of a band whose tensors take ``per_row`` bytes per row (plus ``halo`` rows), within what the maps on the
        device leave of the budget; at least one."""
        free = self.budget - self.on_device
        return max(1, int(free / (WORKSPACE_FACTOR * per_row)) - math.ceil(halo))

    def row_bytes(self, x) -> int:
        """Bytes of one row of x (a map, stored or computed) in the compute dtype."""
        return self.dtype.itemsize * x.shape[0] * x.shape[1] * x.shape[3]


class StreamedMoments:
    """Whole-map per-channel moments merged band by band (count per channel, mean and M2 in float64, each (B, C))."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, band: torch.Tensor) -> None:
        """Merge the moments of ``band`` (B, C, rows, W): two passes (the mean, then the centred squares with the
        residual of the mean corrected), summed in chunks of rows in the band's dtype (float32 for half), merged in
        float64."""
        b, c, h, w = band.shape
        dtype = band.dtype if band.dtype in (torch.float32, torch.float64) else torch.float32
        shift = band.sum(dim=(2, 3), keepdim=True, dtype=dtype) / (h * w)  # (B, C, 1, 1)
        dev = sq = 0
        step = max(1, MOMENT_CHUNK // (b * c * w))
        for r0 in range(0, h, step):
            centred = band[:, :, r0: r0 + step] - shift  # half: computed in float32
            dev = dev + centred.sum(dim=(2, 3)).double()  # summing in float64 directly is ~20x slower
            sq = sq + centred.square_().sum(dim=(2, 3)).double()
        count = h * w
        part = (count, shift[:, :, 0, 0].double() + dev / count, sq - dev.square() / count)
        self.n, self.mean, self.m2 = part if self.mean is None else merge_moments((self.n, self.mean, self.m2), part)

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, biased var) of the whole map, each (B, C) float64."""
        return self.mean, self.m2 / self.n

    def group_stats(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (mean, biased var) of the whole map, each (B, groups) float64."""
        return group_moments(self.mean, self.m2 / self.n, groups)


class Map:
    """A whole map (B, C, H, W) held as a tensor (on the device or in host memory), read and written in bands of rows;
    a pass writing it merges the moments of its bands into ``moments`` (the next layer's GroupNorm statistics).

    Stored in a 2-byte dtype narrower than the compute dtype, every row of every channel is stored relative to its
    midrange (``centres``, (B, C, H) in the compute dtype, on the device), and in float16 also scaled by the power of
    two that brings its largest magnitude just under 2¹⁵ (``exponents``, (B, C, H) int32): float16's precision without
    its range limit (the SD VAE's activations overflow float16; ``docs/tiling.md``).
    """

    read_maps = 1  # temporaries of reading a row, in rows of this map (a computed map's reads cost more)

    def __init__(self, store: MapStore, tensor: torch.Tensor | None, *, counted: int = 0, in_host: int = 0,
                 track: bool = True, shape: tuple[int, ...] | None = None):
        self.store, self.tensor, self.counted, self.in_host, self.track = store, tensor, counted, in_host, track
        self.on_device = counted > 0  # held on the device within the budget (else in host memory or a file)
        self.moments = None
        self.shape = torch.Size(shape if shape is not None else tensor.shape)
        narrow = track and store.storage.itemsize == 2 and store.dtype.itemsize > 2
        b, c, h, _ = self.shape
        self.centres = torch.zeros(b, c, h, dtype=store.dtype, device=store.device) if narrow else None
        self.exponents = None
        if narrow and store.storage == torch.float16:
            self.exponents = torch.zeros(b, c, h, dtype=torch.int32, device=store.device)
        for side in (self.centres, self.exponents):  # on the device whatever the store: counted in the budget
            if side is not None:
                store.on_device += side.nbytes
                self.counted += side.nbytes

    @classmethod
    def wrap(cls, store: MapStore, tensor: torch.Tensor) -> "Map":
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
        """Rows r0:r1 on the compute device in the compute dtype: a new tensor, which the caller may write into."""
        band = self._get(r0, r1).to(self.store.device, self.store.dtype, memory_format=torch.contiguous_format,
                                    copy=True)
        if self.exponents is not None:
            band.mul_(torch.exp2((self.exponents[:, :, r0:r1] - SCALED_MAX_EXPONENT).to(band.dtype))[..., None])
        if self.centres is not None:
            band.add_(self.centres[:, :, r0:r1, None])
        return band

    def begin(self) -> None:
        """Start a pass writing the map: its moments restart from nothing."""
        self.moments = StreamedMoments() if self.track else None

    def write(self, r0: int, band: torch.Tensor) -> None:
        """Store the computed ``band`` at rows r0.., and merge its moments (of the computed values, before the
        storage rounding: what the untiled network normalizes). A 2-byte map centres and scales ``band`` in place:
        callers pass their own temporaries."""
        if self.moments is not None:
            self.moments.add(band)
        if self.centres is not None:
            low, high = band.amin(dim=3), band.amax(dim=3)  # (B, C, rows): no band-sized temporary
            centre = (low + high) / 2
            self.centres[:, :, r0: r0 + band.shape[2]] = centre
            band.sub_(centre[..., None])
        if self.exponents is not None:  # |band| < 2**exponent per row and channel → |scaled| < 2**SCALED_MAX_EXPONENT
            exponent = torch.frexp(torch.maximum(high - centre, centre - low)).exponent
            self.exponents[:, :, r0: r0 + band.shape[2]] = exponent
            band.mul_(torch.exp2((SCALED_MAX_EXPONENT - exponent).to(band.dtype))[..., None])
        self._put(r0, band)

    def free(self) -> None:
        """Release the map (its bytes return to the budget and the host cap)."""
        self.store.on_device -= self.counted
        self.store.in_host -= self.in_host
        self.counted, self.in_host, self.tensor, self.exponents, self.centres = 0, 0, None, None, None


class FileMap(Map):
    """A map in an unlinked temporary file, laid out (H, B, C, W) so that a band of rows is one byte range, read and
    written with one ``preadv``/``pwrite`` per band: its pages are in the kernel's page cache (written back to disk
    when memory is short), never in the process, and no page is faulted in one at a time."""

    def __init__(self, store: MapStore, shape: tuple[int, ...]):
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
