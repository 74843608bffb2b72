"""Image data for autoencoder training: HF ``datasets`` streams -> robust decode -> [-1, 1] batches that resume exactly.

Public API (keyword-only after the first argument)::

    load_image_dataset(*, dataset_name=None, dataset_config_name=None, train_data_dir=None, data_files=None,
                       image_paths=None, split="train", streaming=None, cache_dir=None, num_shards=64)
        -> datasets.IterableDataset
        # Hub id (streaming by default) | local image folder (``imagefolder``) | data_files (*.parquet, *.tar
        # webdataset, *.arrow, or image files) | an explicit list of image paths. Always an IterableDataset.

    check_image_column(dataset, image_column=None) -> str
        # the image column's name; None auto-detects "image", "img", "jpg", "png", "webp", "jpeg".
        # ValueError listing the existing columns if it is missing.

    decode_image(data: bytes, *, name: str) -> PIL.Image.Image   # imaging's one reader (8-bit RGB); UnreadableImage if not
    preprocess_image(img, *, resolution, center_crop=True, random_flip=False, generator=None) -> Tensor (3, res, res)

    make_train_stream(dataset, *, image_column=None, resolution, batch_size, center_crop=False, random_flip=True,
                      shuffle_buffer_size=1000, seed=0, process_index=0, num_processes=1, min_size=None,
                      exclude=frozenset(), num_threads=0) -> ImageStream

    class ImageStream:                       # an endless, resumable batch iterator (use it instead of a DataLoader)
        __iter__()  -> yields {"pixel_values": float32 (batch_size, 3, res, res) in [-1, 1]}, epoch after epoch
        examples()  -> yields {"pixel_values": (3, res, res)} one image at a time (same stream, same state)
        state_dict() -> dict                 # JSON-serialisable: exact position + counters; take it between batches
        load_state_dict(state, *, strict=True)
        epoch: int; seen: int (images yielded); skipped: int (unreadable or too small); excluded: int (held out)
        skip_reasons: dict[str, int]          # skipped images by reason ("undecodable", "dangling symlink", "too small"...)

    take_validation_images(dataset, n, *, image_column=None, resolution, min_size=None) -> ValidationImages
    load_validation_images(paths, *, resolution) -> ValidationImages
    @dataclass ValidationImages: pixel_values (n, 3, res, res) in [-1, 1]; names: list[str]; keys: frozenset[str]
        # pass ``exclude=val.keys`` to make_train_stream so held-out images never reach training

Typical use (what ``train_autoencoder.py`` does)::

    ds = load_image_dataset(train_data_dir="assets/photos")   # listed by imaging.list_image_paths
    val = take_validation_images(ds, 2, resolution=128)
    stream = make_train_stream(ds, resolution=128, batch_size=4, seed=0, exclude=val.keys,
                               process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    for step, batch in zip(range(max_steps), stream):   # endless; checkpoint with stream.state_dict()
        ...

Why not ``datasets``' own shuffle buffer: ``IterableDataset.state_dict()`` does not hold the buffer's content, so a
resumed run refills the buffer and sees different images (the library documents this). We shuffle in windows
("blocks") of ``shuffle_buffer_size`` examples on top of ``datasets``' per-epoch shard shuffle, and the state holds
the ``datasets`` position at the start of the current block: resuming re-reads at most one block of raw bytes (no
decoding) and continues bit for bit. Crop and flip draw from a generator seeded by the example's position, so
they do not depend on what ran before either.

The pixel convention (see ``imaging``): float32 RGB in [-1, 1], shape (3, H, W); a batch is ``torch.stack`` of them.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .imaging import IMAGE_EXTENSIONS, UnreadableImage, decode_image, list_image_paths, read_image_bytes, resize_and_crop, to_tensor

if TYPE_CHECKING:  # datasets is a heavy import; only the functions that need it import it
    import datasets

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "png", "webp", "jpeg")  # auto-detect order (webdataset keys last)
MAX_SKIP_WARNINGS = 10  # log each of the first skipped images by name, then one summary line per SKIP_SUMMARY_EVERY
SKIP_SUMMARY_EVERY = 100
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------- loading


def _builder_for(data_files: str | Sequence[str] | dict) -> str:
    """data_files -> the ``datasets`` builder that reads them (by extension of the first file)."""
    if isinstance(data_files, dict):
        files = [f for v in data_files.values() for f in ([v] if isinstance(v, str) else v)]
    else:
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not files:
        raise ValueError("data_files is empty: expected *.parquet, *.tar (webdataset), *.arrow or image files")
    name = os.fspath(files[0]).lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".tar"):
        return "webdataset"
    if name.endswith(".arrow"):
        return "arrow"
    if name.endswith(IMAGE_EXTENSIONS):
        return "imagefolder"
    raise ValueError(f"cannot tell the format of data_files {files[0]!r}: expected *.parquet, *.tar (webdataset), *.arrow or image files")


def load_image_dataset(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    data_files: str | Sequence[str] | dict | None = None,
    image_paths: Sequence[str | os.PathLike] | None = None,
    split: str = "train",
    streaming: bool | None = None,
    cache_dir: str | None = None,
    num_shards: int = 64,
) -> "datasets.IterableDataset":
    """Open an image dataset as a ``datasets.IterableDataset`` (one code path for training, whatever the source).

    Exactly one source is given:

    Args:
        dataset_name (`str`, *optional*): a Hub dataset id (or anything ``datasets.load_dataset`` takes as ``path``).
        dataset_config_name (`str`, *optional*): its configuration name.
        train_data_dir (`str`, *optional*): a local folder of images, listed recursively by
            ``imaging.list_image_paths``: every image-named path is a row, unreadable ones (dangling symlinks,
            FIFOs, folders named ``x.jpg``) included, so the stream counts them with their reason.
        data_files (`str`, `list` or `dict`, *optional*): *.parquet, *.tar (webdataset), *.arrow or image files (image
            files and globs of them are read like ``image_paths``); with ``dataset_name`` they are passed through to it.
        image_paths (`list`, *optional*): explicit image files; column ``"image"``. A path that does not exist at all
            raises (a typo); one that exists but is not a readable image is a counted skip.
        split (`str`, *optional*, defaults to `"train"`): the split to read.
        streaming (`bool`, *optional*): defaults to True for ``dataset_name`` (data too large for disk) and False for
            local sources (then the Arrow table is cut into ``num_shards`` shards so epochs and processes can shuffle
            and split it).
        cache_dir (`str`, *optional*): ``datasets`` cache folder.
        num_shards (`int`, *optional*, defaults to 64): shards of a non-streaming dataset (at most one per row); a
            power of two divides evenly over 1, 2, 4, ... processes.
    """
    import datasets

    sources = [s is not None for s in (train_data_dir, image_paths)] + [dataset_name is not None or data_files is not None]
    if sum(sources) != 1:
        raise ValueError("give exactly one of dataset_name (optionally with data_files), train_data_dir, data_files or image_paths")
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"train_data_dir is not a folder: {os.fspath(train_data_dir)!r}")
        image_paths = list_image_paths(train_data_dir)
        if not image_paths:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {os.fspath(train_data_dir)!r}")
    elif dataset_name is None and data_files is not None and _builder_for(data_files) == "imagefolder":
        image_paths = _expand_image_files(data_files, split)
    if image_paths is not None:
        return _path_dataset(image_paths, num_shards)

    kwargs: dict[str, Any] = {"split": split, "cache_dir": cache_dir}
    if dataset_name is not None:
        streaming = True if streaming is None else streaming
        kwargs.update(path=dataset_name, name=dataset_config_name, data_files=data_files)
    else:
        streaming = False if streaming is None else streaming
        kwargs.update(path=_builder_for(data_files), data_files=data_files)
    dataset = datasets.load_dataset(streaming=streaming, **kwargs)
    if isinstance(dataset, datasets.IterableDataset):
        return dataset
    return dataset.to_iterable_dataset(num_shards=max(1, min(num_shards, len(dataset))))


def _expand_image_files(data_files: str | Sequence[str] | dict, split: str) -> list[str]:
    """Image data_files (paths or globs; a dict is indexed by ``split``) -> paths, each glob sorted, in the given order."""
    if isinstance(data_files, dict):
        data_files = data_files[split]
    patterns = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    paths = []
    for pattern in map(os.fspath, patterns):
        paths += sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not paths:
        raise FileNotFoundError(f"data_files {patterns} match no file")
    return paths


def _path_dataset(image_paths: Sequence[str | os.PathLike], num_shards: int) -> "datasets.IterableDataset":
    """Local image paths -> an IterableDataset with column ``"image"`` ({"path", "bytes": None}, decoded by the stream)."""
    import datasets

    paths = [os.fspath(p) for p in image_paths]
    if not paths:
        raise ValueError("image_paths is empty")
    for p in paths:
        if not os.path.lexists(p):  # a dangling symlink exists as a path: the reader counts it
            raise FileNotFoundError(f"image file not found: {p!r}")
    table = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image(decode=False))
    return table.to_iterable_dataset(num_shards=max(1, min(num_shards, len(table))))


def _column_names(dataset: "datasets.IterableDataset") -> list[str]:
    names = dataset.column_names
    if names is None:  # features unknown until read (some streamed formats): look at the first example
        first = next(iter(dataset.take(1)), None)
        if first is None:
            raise ValueError("the dataset is empty")
        names = list(first)
    return list(names)


def check_image_column(dataset: "datasets.IterableDataset", image_column: str | None = None) -> str:
    """Return the image column's name; ``None`` auto-detects one of ``IMAGE_COLUMN_CANDIDATES``.

    Raises ``ValueError`` listing the dataset's columns when the column is missing (before any training work).
    """
    names = _column_names(dataset)
    if image_column is None:
        for candidate in IMAGE_COLUMN_CANDIDATES:
            if candidate in names:
                return candidate
        raise ValueError(f"no image column found among the dataset's columns {names}; pass --image_column (one of them)")
    if image_column not in names:
        raise ValueError(f"image column {image_column!r} not in the dataset; its columns are {names}")
    return image_column


def _raw_images(dataset: "datasets.IterableDataset", image_column: str) -> "datasets.IterableDataset":
    """Keep only the image column and turn its decoding off: we decode ourselves, so a bad file cannot raise inside datasets."""
    import datasets

    dataset = dataset.select_columns([image_column])
    feature = (dataset.features or {}).get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


# --------------------------------------------------------------------------------------------------- decoding


def _read_bytes(value: Any) -> tuple[bytes, str]:
    """One raw column value ({"bytes", "path"} dict, raw bytes, or a path) -> (encoded bytes, name for messages)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data, path = bytes(value), None
    elif isinstance(value, (str, os.PathLike)):
        data, path = None, os.fspath(value)
    elif isinstance(value, Image.Image):  # an already decoded image (a column that is not an Image feature)
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue(), "<PIL image>"
    else:
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    name = path or "<bytes>"
    if data is not None:
        return data, name
    if path is None:
        raise UnreadableImage("<row>", "no image", "neither bytes nor path")
    if os.path.lexists(path) or "://" not in path:
        return read_image_bytes(path), name  # the one reader: FIFOs, folders and dangling symlinks refused by name
    try:  # a remote file of a streamed dataset (hf://, zip://...::https://); auth from env/login cache
        from datasets.utils.file_utils import xopen

        with xopen(path, "rb") as f:
            return f.read(), name
    except OSError as err:
        raise UnreadableImage(path, "unreadable file", str(err)) from err


def preprocess_image(
    img: Image.Image,
    *,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    generator: torch.Generator | None = None,
    crop_zoom: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """RGB PIL image -> (3, resolution, resolution) float32 in [-1, 1]: resize shorter side, crop, maybe flip.

    Args:
        resolution (`int`): output side in pixels.
        center_crop (`bool`, *optional*, defaults to True): center crop; False draws a random crop from ``generator``.
        random_flip (`bool`, *optional*, defaults to False): horizontal flip with probability 1/2 (from ``generator``).
        generator (`torch.Generator`, *optional*): the source of the zoom, the crop offset and the flip.
        crop_zoom (`tuple`, *optional*, defaults to `(1.0, 1.0)`): the shorter side is resized to ``zoom * resolution``
            with ``zoom`` uniform in this range (capped at the photo's own size), so crops show the image at several
            scales; ``(1, 1)`` draws nothing (the whole shorter side in every crop).
    """
    zoom = 1.0
    if crop_zoom != (1.0, 1.0):
        low, high = crop_zoom
        zoom = low + (high - low) * float(torch.rand((), generator=generator))
    img = resize_and_crop(img, resolution, center_crop=center_crop, generator=generator, zoom=zoom)
    if random_flip and torch.rand((), generator=generator) < 0.5:
        img = ImageOps.mirror(img)
    return to_tensor(img)


def _fingerprint(data: bytes) -> str:
    """Identity of an encoded image (for held-out exclusion): same bytes, same key, wherever the file sits."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _example_seed(*parts: int) -> int:
    """Position (seed, epoch, process, block, offset) -> an independent 63-bit seed (no correlation between neighbours)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------------- validation


@dataclass
class ValidationImages:
    """Held-out images, center-cropped.

    Attributes:
        pixel_values (`torch.Tensor`): (n, 3, res, res) float32 in [-1, 1].
        names (`list[str]`): file names (or "<bytes>") in order, for captions and logs.
        keys (`frozenset[str]`): fingerprints of the encoded files; ``make_train_stream(exclude=keys)`` drops them.
    """

    pixel_values: torch.Tensor
    names: list[str]
    keys: frozenset[str] = field(default_factory=frozenset)


def take_validation_images(
    dataset: "datasets.IterableDataset",
    n: int,
    *,
    image_column: str | None = None,
    resolution: int,
    min_size: int | None = None,
) -> ValidationImages:
    """The first ``n`` decodable images of the unshuffled stream (the same on every process), center-cropped.

    Exclude them from training with ``make_train_stream(..., exclude=result.keys)``: exclusion is by content
    fingerprint, so it holds whatever the shuffle, sharding or epoch (and also drops duplicates of them).
    Args as in ``make_train_stream``; fewer than ``n`` found logs a warning, none raises ``ValueError``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    image_column = check_image_column(dataset, image_column)
    min_size = _default_min_size(resolution) if min_size is None else min_size
    images, names, keys = [], [], set()
    for example in _raw_images(dataset, image_column):
        try:
            data, name = _read_bytes(example[image_column])
            img = decode_image(data, name=name)
        except ValueError as err:
            logger.warning("validation: skipped %s", err)
            continue
        if min(img.size) < min_size:
            continue
        images.append(preprocess_image(img, resolution=resolution, center_crop=True))
        names.append(os.path.basename(name) if name != "<bytes>" else f"image {len(names)}")
        keys.add(_fingerprint(data))
        if len(images) == n:
            break
    if not images:
        raise ValueError(f"no decodable image of at least {min_size} px found for validation")
    if len(images) < n:
        logger.warning("only %d of %d validation images found", len(images), n)
    return ValidationImages(torch.stack(images), names, frozenset(keys))


def load_validation_images(paths: Sequence[str | os.PathLike], *, resolution: int) -> ValidationImages:
    """Explicit validation files -> center-cropped [-1, 1] batch (``imaging.load_image``; ValueError names a bad file)."""
    if not paths:
        raise ValueError("no validation image paths given")
    images, keys = [], set()
    for path in paths:
        if not os.path.lexists(path):
            raise FileNotFoundError(f"validation image not found: {os.fspath(path)!r}")
        data = read_image_bytes(path)  # chosen by hand: an unreadable one raises (UnreadableImage names it)
        images.append(preprocess_image(decode_image(data, name=os.fspath(path)), resolution=resolution, center_crop=True))
        keys.add(_fingerprint(data))
    return ValidationImages(torch.stack(images), [os.path.basename(os.fspath(p)) for p in paths], frozenset(keys))


# --------------------------------------------------------------------------------------------------- training stream


def _default_min_size(resolution: int) -> int:
    # Shorter side below resolution/2 would be upscaled more than 2x: the decoder would learn to draw interpolation blur.
    return resolution // 2


@dataclass
class _Position:
    """Where an example sits: block ``block`` of ``epoch`` starts at ``datasets`` state ``block_start``."""

    epoch: int
    block: int
    block_start: dict | None  # None = the start of the epoch
    offset: int  # index of the example inside its (shuffled) block


class ImageStream:
    """Endless, exactly resumable stream of preprocessed training images; see ``make_train_stream``.

    The stream holds its own position: use one iterator at a time; a new ``iter(stream)`` continues after the last
    batch handed out.

    It is its own loader (no ``torch.utils.data.DataLoader``): a DataLoader's workers and prefetching read ahead of
    what the training loop consumed, so a saved position would not match the weights. Decoding may still use
    ``num_threads`` threads: results are consumed in order and the state only advances when a batch is handed out.
    """

    def __init__(
        self,
        dataset: "datasets.IterableDataset",
        *,
        image_column: str,
        resolution: int,
        batch_size: int,
        center_crop: bool,
        random_flip: bool,
        crop_zoom: tuple[float, float],
        shuffle_buffer_size: int,
        seed: int,
        process_index: int,
        num_processes: int,
        min_size: int,
        exclude: frozenset[str],
        num_threads: int,
    ):
        self.dataset = _raw_images(dataset, image_column)
        self.image_column = image_column
        self.resolution = resolution
        self.batch_size = batch_size
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.crop_zoom = tuple(crop_zoom)
        self.shuffle_buffer_size = shuffle_buffer_size
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.min_size = min_size
        self.exclude = frozenset(exclude)
        self.num_threads = num_threads
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
        return {
            "version": STATE_VERSION,
            "epoch": pos.epoch,
            "block": pos.block,
            "block_start": pos.block_start,
            "offset": pos.offset,
            "seen": self.seen,
            "skipped": self.skipped,
            "skip_reasons": dict(self.skip_reasons),
            "excluded": self.excluded,
            # the stream's identity: resuming under different values cannot continue the same sequence
            "seed": self.seed,
            "process_index": self.process_index,
            "num_processes": self.num_processes,
            "shuffle_buffer_size": self.shuffle_buffer_size,
        }

    def load_state_dict(self, state: dict, *, strict: bool = True) -> None:
        """Continue from ``state``. With ``strict=False`` a changed seed/process count/buffer restarts the saved
        epoch from its beginning (counters kept) instead of raising ``ValueError``."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown data state version {state.get('version')!r} (expected {STATE_VERSION})")
        identity = ("seed", "process_index", "num_processes", "shuffle_buffer_size")
        changed = [k for k in identity if state[k] != getattr(self, k)]
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
            data, name = _read_bytes(value)
            if self.exclude and _fingerprint(data) in self.exclude:
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
                    raise ValueError(f"epoch {epoch} of process {self.process_index} had no usable image (all undecodable, "
                                     f"smaller than min_size={self.min_size} or excluded); {self.skipped} skipped")
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


def make_train_stream(
    dataset: "datasets.IterableDataset",
    *,
    image_column: str | None = None,
    resolution: int,
    batch_size: int,
    center_crop: bool = False,
    random_flip: bool = True,
    crop_zoom: tuple[float, float] = (1.0, 1.0),
    shuffle_buffer_size: int = 1000,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    min_size: int | None = None,
    exclude: frozenset[str] | set[str] = frozenset(),
    num_threads: int = 0,
) -> ImageStream:
    """The training stream of one process: shard -> block shuffle -> decode -> crop/flip -> [-1, 1] batches, forever.

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
        raise ValueError(f"resolution, batch_size and shuffle_buffer_size must be >= 1, got {resolution}, {batch_size}, {shuffle_buffer_size}")
    if not 1.0 <= crop_zoom[0] <= crop_zoom[1]:
        raise ValueError(f"crop_zoom must be (low, high) with 1 <= low <= high, got {tuple(crop_zoom)}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, num_processes={num_processes}), got {process_index}")
    image_column = check_image_column(dataset, image_column)
    return ImageStream(
        dataset,
        image_column=image_column,
        resolution=resolution,
        batch_size=batch_size,
        center_crop=center_crop,
        random_flip=random_flip,
        crop_zoom=tuple(crop_zoom),
        shuffle_buffer_size=shuffle_buffer_size,
        seed=seed,
        process_index=process_index,
        num_processes=num_processes,
        min_size=_default_min_size(resolution) if min_size is None else min_size,
        exclude=frozenset(exclude),
        num_threads=num_threads,
    )
