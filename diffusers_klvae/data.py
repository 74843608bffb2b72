"""Image data for autoencoder training: any source as a ``datasets.IterableDataset``, decoded by ``imaging``'s one
reader, preprocessed to [-1, 1] crops, with held-out validation images excluded by content (see docs/data.md).

The training stream itself (``make_train_stream``, ``ImageStream``) lives in ``train_stream``; both names are
importable from here.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from PIL import Image, ImageOps

from .imaging import IMAGE_EXTENSIONS, UnreadableImage, decode_image, list_image_paths, read_image_bytes, resize_and_crop, to_tensor

if TYPE_CHECKING:  # datasets is a heavy import; only the functions that need it import it
    import datasets

logger = logging.getLogger(__name__)

FILE_URL = "file://"
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "png", "webp", "jpeg")  # auto-detect order (webdataset keys last)


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


def load_image_dataset(*, dataset_name: str | None = None, dataset_config_name: str | None = None,
                       train_data_dir: str | os.PathLike | None = None,
                       data_files: str | Sequence[str] | dict | None = None,
                       image_paths: Sequence[str | os.PathLike] | None = None, split: str = "train",
                       streaming: bool | None = None, cache_dir: str | None = None,
                       num_shards: int = 64) -> "datasets.IterableDataset":
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

    # a Hub dataset streams by default (data too large for disk); local files are read by their builder
    path, name = (dataset_name, dataset_config_name) if dataset_name is not None else (_builder_for(data_files), None)
    streaming = dataset_name is not None if streaming is None else streaming
    dataset = datasets.load_dataset(path=path, name=name, data_files=data_files, split=split, cache_dir=cache_dir,
                                    streaming=streaming)
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
    column = [_column_path(p) for p in paths]
    table = datasets.Dataset.from_dict({"image": column}).cast_column("image", datasets.Image(decode=False))
    return table.to_iterable_dataset(num_shards=max(1, min(num_shards, len(table))))


def _column_path(path: str) -> str:
    """A local path as an Arrow string column can hold it. A file name that is not UTF-8 (e.g. Latin-1 ``caf\\xe9.png``
    on Linux) reaches Python with surrogate escapes, which Arrow refuses: it becomes a percent-encoded ``file://`` URL
    of its bytes, which :func:`read_image_value` turns back into the path."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return FILE_URL + urllib.parse.quote(os.fsencode(os.path.abspath(path)))
    return path


def check_image_column(dataset: "datasets.IterableDataset", image_column: str | None = None) -> str:
    """Return the image column's name; ``None`` auto-detects one of ``IMAGE_COLUMN_CANDIDATES``.

    Raises ``ValueError`` listing the dataset's columns when the column is missing (before any training work).
    """
    names = dataset.column_names
    if names is None:  # features unknown until read (some streamed formats): look at the first example
        first = next(iter(dataset.take(1)), None)
        if first is None:
            raise ValueError("the dataset is empty")
        names = list(first)
    names = list(names)
    if image_column is None:
        for candidate in IMAGE_COLUMN_CANDIDATES:
            if candidate in names:
                return candidate
        raise ValueError(f"no image column found among the dataset's columns {names}; pass --image_column (one of them)")
    if image_column not in names:
        raise ValueError(f"image column {image_column!r} not in the dataset; its columns are {names}")
    return image_column


def raw_image_column(dataset: "datasets.IterableDataset", image_column: str) -> "datasets.IterableDataset":
    """Keep only the image column and turn its decoding off: we decode ourselves, so a bad file cannot raise inside datasets."""
    import datasets

    dataset = dataset.select_columns([image_column])
    feature = (dataset.features or {}).get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


# --------------------------------------------------------------------------------------------------- decoding


def read_image_value(value: Any) -> tuple[bytes, str]:
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
    if path is not None and path.startswith(FILE_URL):  # a local file (see _column_path): the path of its bytes
        path = os.fsdecode(urllib.parse.unquote_to_bytes(path[len(FILE_URL):]))
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


def preprocess_image(img: Image.Image, *, resolution: int, center_crop: bool = True, random_flip: bool = False,
                     generator: torch.Generator | None = None,
                     crop_zoom: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
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


def image_fingerprint(data: bytes) -> str:
    """Identity of an encoded image (for held-out exclusion): same bytes, same key, wherever the file sits."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


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


def take_validation_images(dataset: "datasets.IterableDataset", n: int, *, image_column: str | None = None,
                           resolution: int, min_size: int | None = None) -> ValidationImages:
    """The first ``n`` decodable images of the unshuffled stream (the same on every process), center-cropped.

    Exclude them from training with ``make_train_stream(..., exclude=result.keys)``: exclusion is by content
    fingerprint, so it holds whatever the shuffle, sharding or epoch (and also drops duplicates of them).
    Args as in ``make_train_stream``; fewer than ``n`` found logs a warning, none raises ``ValueError``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    image_column = check_image_column(dataset, image_column)
    min_size = default_min_size(resolution) if min_size is None else min_size
    images, names, keys = [], [], set()
    for example in raw_image_column(dataset, image_column):
        try:
            data, name = read_image_value(example[image_column])
            img = decode_image(data, name=name)
        except ValueError as err:
            logger.warning("validation: skipped %s", err)
            continue
        if min(img.size) < min_size:
            continue
        images.append(preprocess_image(img, resolution=resolution, center_crop=True))
        names.append(os.path.basename(name) if name != "<bytes>" else f"image {len(names)}")
        keys.add(image_fingerprint(data))
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
        keys.add(image_fingerprint(data))
    return ValidationImages(torch.stack(images), [os.path.basename(os.fspath(p)) for p in paths], frozenset(keys))


def default_min_size(resolution: int) -> int:
    # Shorter side below resolution/2 would be upscaled more than 2x: the decoder would learn to draw interpolation blur.
    return resolution // 2


def __getattr__(name: str):
    # the training stream lives in ``train_stream`` (it imports this module); its names stay importable from here
    if name in ("ImageStream", "make_train_stream"):
        from . import train_stream

        return getattr(train_stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
