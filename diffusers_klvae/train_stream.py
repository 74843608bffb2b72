"""The training stream: shard -> block shuffle -> decode (``imaging``'s one reader) -> crop/flip -> [-1, 1] batches,
forever, exactly resumable. ``data`` re-exports ``make_train_stream`` and ``ImageStream`` (API: docs/data.md).

Why not ``datasets``' own shuffle buffer: ``IterableDataset.state_dict()`` does not hold the buffer's content, so a
resumed run refills the buffer and sees different images (the library documents this). We shuffle in windows
("blocks") of ``shuffle_buffer_size`` examples on top of ``datasets``' per-epoch shard shuffle, and the state holds
the ``datasets`` position at the start of the current block: resuming re-reads at most one block of raw bytes (no
decoding) and continues bit for bit. Crop and flip draw from a generator seeded by the example's position, so
they do not depend on what ran before either.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from .data import (check_image_column, default_min_size, image_fingerprint, preprocess_image, raw_image_column,
                   read_image_value)
from .imaging import UnreadableImage, decode_image

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger("diffusers_klvae.data")  # the stream's messages keep the logger users filter on

MAX_SKIP_WARNINGS = 10  # log each of the first skipped images by name, then one summary line per SKIP_SUMMARY_EVERY
SKIP_SUMMARY_EVERY = 100
STATE_VERSION = 1
# the stream's identity: resuming under different values cannot continue the same sequence
_IDENTITY = ("seed", "process_index", "num_processes", "shuffle_buffer_size")


def _example_seed(*parts: int) -> int:
    """Position (seed, epoch, process, block, offset) -> an independent 63-bit seed (no correlation between neighbours)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass
class _Position:
    """Where an example sits: block ``block`` of ``epoch`` starts at ``datasets`` state ``block_start``."""

    epoch: int
    block: int
    block_start: dict | None  # None = the start of the epoch
    offset: int  # index of the example inside its (shuffled) block


class ImageStream:
    """Endless, exactly resumable stream of preprocessed training images (``make_train_stream`` is the same).

    The stream holds its own position: use one iterator at a time; a new ``iter(stream)`` continues after the last
    batch handed out.

    It is its own loader (no ``torch.utils.data.DataLoader``): a DataLoader's workers and prefetching read ahead of
    what the training loop consumed, so a saved position would not match the weights. Decoding may still use
    ``num_threads`` threads: results are consumed in order and the state only advances when a batch is handed out.
    """

    def __init__(self, dataset: "datasets.IterableDataset", *, image_column: str | None = None, resolution: int,
                 batch_size: int, center_crop: bool = False, random_flip: bool = True,
                 crop_zoom: tuple[float, float] = (1.0, 1.0), shuffle_buffer_size: int = 1000, seed: int = 0,
                 process_index: int = 0, num_processes: int = 1, min_size: int | None = None,
                 exclude: frozenset[str] | set[str] = frozenset(), num_threads: int = 0):
        """The training stream of one process: shard -> block shuffle -> decode -> crop/flip -> [-1, 1] batches.

        Args:
            dataset (`datasets.IterableDataset`): from ``load_image_dataset`` (the same, unsplit, on every process).
            image_column (`str`, *optional*): checked by ``check_image_column`` (None auto-detects).
            resolution (`int`): side of the square crops.
            batch_size (`int`): images per batch of this process.
            center_crop (`bool`, *optional*, defaults to False): center crops instead of random crops.
            random_flip (`bool`, *optional*, defaults to True): horizontal flips with probability 1/2.
            crop_zoom (`tuple`, *optional*, defaults to `(1.0, 1.0)`): random zoom range of the crops (``preprocess_image``).
            shuffle_buffer_size (`int`, *optional*, defaults to 1000): examples shuffled together per block; resuming
                re-reads at most this many raw files. 1 keeps the stored order.
            seed (`int`, *optional*, defaults to 0): seeds the block shuffles, crops and flips (same seed, same stream).
            process_index (`int`, *optional*, defaults to 0) / num_processes (`int`, *optional*, defaults to 1): this
                process's share via ``datasets.distributed.split_dataset_by_node`` (disjoint across processes).
            min_size (`int`, *optional*): skip images whose shorter side is smaller; defaults to ``resolution // 2``
                (more upscaling teaches blur). 0 keeps every decodable image.
            exclude (`frozenset[str]`, *optional*): fingerprints to drop (``ValidationImages.keys``).
            num_threads (`int`, *optional*, defaults to 0): decode threads (0 = in the training thread); exactness holds.
        """
        if resolution < 1 or batch_size < 1 or shuffle_buffer_size < 1:
            raise ValueError(f"resolution, batch_size and shuffle_buffer_size must be >= 1, got {resolution}, {batch_size}, "
                             f"{shuffle_buffer_size}")
        if not 1.0 <= crop_zoom[0] <= crop_zoom[1]:
            raise ValueError(f"crop_zoom must be (low, high) with 1 <= low <= high, got {tuple(crop_zoom)}")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must be in [0, num_processes={num_processes}), got {process_index}")
        self.image_column = check_image_column(dataset, image_column)
        self.dataset = raw_image_column(dataset, self.image_column)
        self.resolution, self.batch_size, self.shuffle_buffer_size = resolution, batch_size, shuffle_buffer_size
        self.center_crop, self.random_flip, self.crop_zoom = center_crop, random_flip, tuple(crop_zoom)
        self.seed, self.process_index, self.num_processes = seed, process_index, num_processes
        self.min_size = default_min_size(resolution) if min_size is None else min_size
        self.exclude, self.num_threads = frozenset(exclude), num_threads
        self._position = _Position(epoch=0, block=0, block_start=None, offset=0)
        self.seen = 0  # images handed out by this process
        self.skipped = 0  # unreadable or smaller than min_size
        self.skip_reasons: dict[str, int] = {}  # the same, by UnreadableImage.reason
        self.excluded = 0  # held-out validation images met in the training stream

    @property
    def epoch(self) -> int:
        return self._position.epoch

    # ----- state

    def state_dict(self) -> dict:
        """Exact position (after the last batch handed out) and counters; JSON-serialisable."""
        pos = self._position
        return {"version": STATE_VERSION, "epoch": pos.epoch, "block": pos.block, "block_start": pos.block_start,
                "offset": pos.offset, "seen": self.seen, "skipped": self.skipped,
                "skip_reasons": dict(self.skip_reasons), "excluded": self.excluded,
                **{k: getattr(self, k) for k in _IDENTITY}}

    def load_state_dict(self, state: dict, *, strict: bool = True) -> None:
        """Continue from ``state``. With ``strict=False`` a changed seed/process count/buffer restarts the saved
        epoch from its beginning (counters kept) instead of raising ``ValueError``."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown data state version {state.get('version')!r} (expected {STATE_VERSION})")
        changed = [k for k in _IDENTITY if state[k] != getattr(self, k)]
        if changed:
            message = ", ".join(f"{k}: saved {state[k]} != now {getattr(self, k)}" for k in changed)
            if strict:
                raise ValueError(f"data stream state does not match this stream ({message}); pass strict=False to restart epoch {state['epoch']}")
        self.seen, self.skipped, self.excluded = state["seen"], state["skipped"], state["excluded"]
        self.skip_reasons = dict(state.get("skip_reasons", {}))  # absent in states saved before reasons were counted
        if changed:
            logger.warning("data stream changed (%s): restarting epoch %d from its beginning", message, state["epoch"])
            self._position = _Position(epoch=state["epoch"], block=0, block_start=None, offset=0)
            return
        self._position = _Position(state["epoch"], state["block"], state["block_start"], state["offset"])

    # ----- iteration

    def _epoch_dataset(self, epoch: int) -> "datasets.IterableDataset":
        from datasets.distributed import split_dataset_by_node

        dataset = self.dataset
        if self.num_processes > 1:
            # every process shuffles shards with the same epoch seed, then keeps its own shards (or every n-th example)
            dataset = split_dataset_by_node(dataset, rank=self.process_index, world_size=self.num_processes)
        dataset.set_epoch(epoch)  # datasets reshuffles the shard order per epoch (epoch 0: stored order)
        return dataset

    def _raw(self) -> Iterator[tuple[_Position, Any]]:
        """(position, raw column value) from the saved position on, forever; blocks shuffled by their own seed."""
        pos = self._position
        epoch, block, block_start, offset = pos.epoch, pos.block, pos.block_start, pos.offset
        while True:
            dataset = self._epoch_dataset(epoch)
            # None clears a state loaded for an earlier block (the unsplit dataset object is reused across epochs)
            dataset.load_state_dict(block_start)  # type: ignore[arg-type]
            examples = iter(dataset)
            read_any = block_start is not None or block > 0
            while True:
                rows = list(itertools.islice(examples, self.shuffle_buffer_size))
                if not rows:
                    break
                read_any = True
                next_start = dataset.state_dict()  # position after this block, before anything is yielded
                order = np.random.default_rng([self.seed, epoch, self.process_index, block]).permutation(len(rows))
                for k in range(offset, len(rows)):
                    yield _Position(epoch, block, block_start, k), rows[order[k]][self.image_column]
                block, block_start, offset = block + 1, next_start, 0
            if not read_any:
                raise ValueError(f"process {self.process_index} of {self.num_processes} got no examples: the dataset (or its shard) is empty")
            epoch, block, block_start, offset = epoch + 1, 0, None, 0

    def _load(self, item: tuple[_Position, Any]) -> tuple[_Position, torch.Tensor | None, Any]:
        """Raw value -> (position, tensor or None, outcome): None, "excluded" or the ``UnreadableImage`` that skipped
        it. Pure function of the position: thread-safe."""
        pos, value = item
        try:
            data, name = read_image_value(value)
            if self.exclude and image_fingerprint(data) in self.exclude:
                return pos, None, "excluded"
            img = decode_image(data, name=name)
            if min(img.size) < self.min_size:
                raise UnreadableImage(name, "too small", f"{img.size[0]}x{img.size[1]}, shorter side below min_size={self.min_size}")
        except ValueError as err:  # UnreadableImage, or an unsupported column value
            return pos, None, err if isinstance(err, UnreadableImage) else UnreadableImage("<row>", "unsupported value", str(err))
        seed = _example_seed(self.seed, pos.epoch, self.process_index, pos.block, pos.offset)
        generator = torch.Generator().manual_seed(seed)
        pixels = preprocess_image(img, resolution=self.resolution, center_crop=self.center_crop, random_flip=self.random_flip,
                                  generator=generator, crop_zoom=self.crop_zoom)
        return pos, pixels, None

    def _loaded(self) -> Iterator[tuple[_Position, torch.Tensor | None, Any]]:
        if self.num_threads <= 0:
            yield from map(self._load, self._raw())
            return
        from concurrent.futures import ThreadPoolExecutor

        # bounded read-ahead, consumed in order: PIL releases the GIL while decoding and resizing
        with ThreadPoolExecutor(self.num_threads, thread_name_prefix="klvae-decode") as pool:
            pending: deque = deque()
            for item in self._raw():
                pending.append(pool.submit(self._load, item))
                if len(pending) >= 4 * self.num_threads:
                    yield pending.popleft().result()

    def _results(self) -> Iterator[tuple[_Position, torch.Tensor | None, Any]]:
        """``_loaded`` plus a guard: a whole epoch without one usable image raises instead of looping forever."""
        epoch, fresh, usable = self._position.epoch, self._position == _Position(self._position.epoch, 0, None, 0), False
        for result in self._loaded():
            pos, pixels, _ = result
            if pos.epoch != epoch:
                if fresh and not usable:
                    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skip_reasons.items()))
                    raise ValueError(f"epoch {epoch} of process {self.process_index} had no usable image: {self.skipped} "
                                     f"skipped ({reasons or 'none'}; min_size={self.min_size}), {self.excluded} held out for "
                                     "validation (--num_validation_images)")
                epoch, fresh, usable = pos.epoch, True, False
            usable = usable or pixels is not None
            yield result

    def _commit(self, pos: _Position, outcome: Any = None) -> None:
        """Advance the saved position past ``pos`` and count what happened to it (``_load``'s outcome)."""
        self._position = _Position(pos.epoch, pos.block, pos.block_start, pos.offset + 1)
        if outcome == "excluded":
            self.excluded += 1
        elif isinstance(outcome, UnreadableImage):
            self.skipped += 1
            self.skip_reasons[outcome.reason] = self.skip_reasons.get(outcome.reason, 0) + 1
            if self.skipped <= MAX_SKIP_WARNINGS:
                logger.warning("skipped %s (%d skipped so far)", outcome, self.skipped)
            elif self.skipped % SKIP_SUMMARY_EVERY == 0:
                logger.warning("%d images skipped so far, by reason %s (latest: %s)", self.skipped, self.skip_reasons, outcome)

    def examples(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``{"pixel_values": (3, res, res)}`` one image at a time, forever, from the current state."""
        for pos, pixels, outcome in self._results():
            self._commit(pos, outcome)
            if pixels is not None:
                self.seen += 1
                yield {"pixel_values": pixels}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``{"pixel_values": (batch_size, 3, res, res)}`` forever; ``state_dict()`` between batches is exact."""
        batch: list[torch.Tensor] = []
        for pos, pixels, outcome in self._results():
            if pixels is None:
                self._commit(pos, outcome)
                continue
            batch.append(pixels)
            if len(batch) == self.batch_size:
                # the position and counter move with the batch, not with the read-ahead
                self._commit(pos)
                self.seen += len(batch)
                yield {"pixel_values": torch.stack(batch)}
                batch = []


make_train_stream = ImageStream  # the name of the training script and docs/data.md
