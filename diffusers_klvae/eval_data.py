"""What ``klvae-eval`` and ``klvae-stats`` share: the named protocols' preprocessing (``PROTOCOLS``, see
docs/evaluation.md#protocols), the image sources (read by ``imaging``'s one reader), settings and arguments."""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .cli_support import check_output_folder, int_at_least
from .data import check_image_column, load_image_dataset, preprocess_image, raw_image_column, read_image_value
from .eval_results import KLVAE_PREPROCESSING, DataSource
from .imaging import IMAGE_EXTENSIONS, UnreadableImage, decode_image, list_image_paths, load_image, to_rgb

logger = logging.getLogger(__name__)

DTYPES = {"float32": None, "fp32": None, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # --dtype -> autocast dtype (None: no autocast)


# --- protocols ---


def klvae_preprocess(img: Image.Image, resolution: int) -> torch.Tensor:
    """RGB PIL image -> (3, resolution, resolution) in [-1, 1]: training's validation crops (bicubic resize of the
    shorter side + center crop, ``data.preprocess_image``)."""
    return preprocess_image(img, resolution=resolution)


def lightningdit_preprocess(img: Image.Image, resolution: int) -> torch.Tensor:
    """RGB PIL image -> (3, resolution, resolution) in [-1, 1], as torchvision's ToTensor, Resize(resolution),
    CenterCrop(resolution), Normalize(0.5, 0.5) on a tensor (bilinear, antialiased)."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255.0
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    size = (resolution, int(resolution * long / short)) if h <= w else (int(resolution * long / short), resolution)
    if size != (h, w):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = int(round((size[0] - resolution) / 2.0)), int(round((size[1] - resolution) / 2.0))
    return x[:, top : top + resolution, left : left + resolution] * 2.0 - 1.0


@dataclass(frozen=True)
class Protocol:
    """A named evaluation protocol: how images are prepared and which latent is decoded."""

    name: str
    preprocess: Callable[[Image.Image, int], torch.Tensor]
    sample_posterior: bool  # the protocol's default; evaluate(sample_posterior=...) may override it
    preprocessing: str  # written into the settings


PROTOCOLS = {
    "klvae": Protocol("klvae", klvae_preprocess, False, KLVAE_PREPROCESSING),
    "lightningdit": Protocol("lightningdit", lightningdit_preprocess, True,
                             "LightningDiT evaluate_tokenizer.py: tensor resize shorter side (interpolate bilinear, "
                             "antialias) + center crop (torchvision rounding)"),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {name!r}")
    return PROTOCOLS[name]


# --- image sources ---


@dataclass
class ImageSource:
    """Images to evaluate, in a fixed order: a folder (``imaging.list_image_paths``: recursive, sorted), a list of
    PIL images or paths, or an HF dataset (a Hub name, streamed, or a ``datasets`` object). Every image goes
    through ``imaging``'s one reader; what it refuses is skipped and counted (``skipped``, ``skipped_names``,
    ``skip_reasons``), never fatal.

    Args:
        data: the images (see above). A string that is not an existing path is read as a Hub dataset name.
        split (`str`, *optional*, defaults to `"validation"`): split of an HF dataset.
        image_column (`str`, *optional*): image column of an HF dataset (auto-detected when `None`).
    """

    data: Any
    split: str = "validation"
    image_column: str | None = None
    skipped: int = 0
    skipped_names: list[str] = field(default_factory=list)
    skip_reasons: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        return self.data_source().describe()

    def data_source(self) -> DataSource:
        """The source as a :class:`DataSource` (what results record)."""
        data = self.data
        if isinstance(data, (str, os.PathLike)):
            path = Path(data).expanduser()
            if path.is_dir() or path.is_file():
                return DataSource("folder" if path.is_dir() else "file", path=os.fspath(path))
            return DataSource("hf-dataset", name=os.fspath(data), split=self.split)
        if (type(data).__module__ or "").startswith("datasets.") and hasattr(data, "features"):  # a datasets object
            return DataSource("datasets-object", type=type(data).__name__)
        return DataSource("images", type=type(data).__name__, count=len(data) if hasattr(data, "__len__") else None)

    def __iter__(self) -> Iterator[tuple[str, Image.Image]]:
        """(name, RGB PIL image) pairs; what the reader refuses is logged, counted and left out. The source opens now:
        a missing folder or dataset fails here, before a caller draws a progress bar."""
        self.skipped, self.skipped_names, self.skip_reasons = 0, [], {}
        return self._read(self._entries())

    def _read(self, entries) -> Iterator[tuple[str, Image.Image]]:
        for name, load in entries:
            try:
                yield name, load()
            except ValueError as err:  # UnreadableImage (a ValueError), or an unexpected value in a dataset row
                reason = err.reason if isinstance(err, UnreadableImage) else "undecodable"
                self.skipped += 1
                self.skipped_names.append(name)
                self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1
                logger.warning("skipped %s: %s", name, err)

    def _entries(self) -> Iterator[tuple[str, Callable[[], Image.Image]]]:
        data, source = self.data, self.data_source()
        if source.kind == "folder":
            files = list_image_paths(source.path)
            if not files:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {source.path!r}")
            return ((os.path.relpath(p, source.path), functools.partial(load_image, p)) for p in files)
        if source.kind == "file":
            if not source.path.lower().endswith(IMAGE_EXTENSIONS):  # e.g. a parquet shard: not read as one image
                raise ValueError(f"data {os.fspath(data)!r} is not an image file ({', '.join(IMAGE_EXTENSIONS)}): "
                                 "give an image folder or an HF dataset name")
            return iter([(os.path.basename(source.path), functools.partial(load_image, source.path))])
        if source.kind == "hf-dataset":  # a string naming no folder or file
            if Path(source.name).expanduser().exists():
                raise ValueError(f"data {source.name!r} is neither a folder nor a regular file")
            # "name" or "org/name" is what `datasets.load_dataset` resolves on the Hub; paths and file names are not
            name = source.name
            if not name or name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix:
                raise FileNotFoundError(f"data {source.name!r}: no such folder or file (nor an HF dataset name)")
            try:
                data = load_image_dataset(dataset_name=source.name, split=self.split, streaming=True)
            except Exception as err:  # noqa: BLE001 - datasets raises many types (FileNotFoundError, ConnectionError...)
                raise ValueError(f"data {source.name!r} is not a local folder and could not be opened as an HF "
                                 f"dataset: {err}") from err
        if source.kind in ("hf-dataset", "datasets-object"):
            return self._hf_entries(data)
        if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
            return (_list_entry(i, item) for i, item in enumerate(data))
        raise ValueError(f"data must be a folder, an HF dataset name or object, or a list of PIL images/paths; "
                         f"got {type(data).__name__}")

    def _hf_entries(self, dataset) -> Iterator[tuple[str, Callable[[], Image.Image]]]:
        column = check_image_column(dataset, self.image_column)
        for i, example in enumerate(raw_image_column(dataset, column)):  # decoding off: a bad row must not stop the stream
            value = example[column]
            if isinstance(value, Image.Image):
                yield f"{i:06d}", (lambda v=value: to_rgb(v))
                continue
            path = value.get("path") if isinstance(value, dict) else None
            name = f"{i:06d}" + (f" ({os.path.basename(path)})" if path else "")
            yield name, (lambda v=value, n=name: decode_image(read_image_value(v)[0], name=n))


def _list_entry(i: int, item) -> tuple[str, Callable[[], Image.Image]]:
    if isinstance(item, Image.Image):
        return f"{i:06d}", (lambda: to_rgb(item))
    if isinstance(item, (str, os.PathLike)):
        return os.path.basename(os.fspath(item)), functools.partial(load_image, item)
    raise ValueError(f"data[{i}] is a {type(item).__name__}: expected a PIL image or an image path")


def iter_batches(source: ImageSource, *, resolution: int, batch_size: int, max_images: int | None,
                 protocol: str = "klvae") -> Iterator[tuple[list[str], torch.Tensor]]:
    """``source`` preprocessed by ``protocol`` (``PROTOCOLS``) in batches (names, (B, 3, resolution, resolution) in
    [-1, 1]) of ``batch_size`` (the last may be smaller), at most ``max_images`` readable images (all when None)."""
    preprocess = get_protocol(protocol).preprocess
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    # each image is resized as soon as it is decoded (a batch of full-size photos would take GBs); the source opens
    # now, and nothing past max_images is read
    images = ((name, preprocess(img, resolution)) for name, img in itertools.islice(iter(source), max_images))

    def batches():
        while chunk := list(itertools.islice(images, batch_size)):
            yield [name for name, _ in chunk], torch.stack([x for _, x in chunk])

    return batches()


# --- run settings and command line, shared by klvae-eval and klvae-stats ---


def autocast_dtype(dtype) -> torch.dtype | None:
    """``dtype`` (a ``DTYPES`` name, a torch dtype or None) -> the autocast dtype, None for float32 (no autocast)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype in (None, torch.float32) else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def check_output_outside_data(output: str | os.PathLike, data: str) -> None:
    """``--output`` must pass ``cli_support.check_output_folder`` and not be a local ``--data`` folder nor inside it:
    the grid and histogram PNGs written there would replace an image of that name or be read as data by the next run."""
    check_output_folder(output, "--output")
    folder, out = Path(data).expanduser().resolve(), Path(output).expanduser().resolve()
    if folder.is_dir() and (out == folder or folder in out.parents):
        raise ValueError(f"--output {os.fspath(output)!r} is inside --data {data!r}: its files would mix with the "
                         "images; expected a folder outside the data")


def resolve_device(device=None, model=None) -> torch.device:
    """``device`` when given, else where a caller's ``model`` (a module) lives, else CUDA when available, else the CPU."""
    if device is not None:
        try:
            device = torch.device(device)
        except RuntimeError as err:  # torch lists every device type it knows, over several lines
            raise ValueError(f"device {device!r} is not a torch device: expected e.g. cpu, cuda, cuda:1 or mps") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine (use --device cpu)")
        return device
    if isinstance(model, torch.nn.Module):
        return next(model.parameters()).device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_name(spec) -> str:
    """A model's name in tables: the spec it was loaded from, or its class name."""
    return type(spec).__name__ if isinstance(spec, torch.nn.Module) else os.fspath(spec)


def add_source_args(parser: argparse.ArgumentParser, *, min_images: int = 1) -> None:
    """The images, their preprocessing and where the model runs: the arguments both commands take."""
    parser.add_argument("--data", required=True, help="image folder, or an HF dataset name (streamed)")
    parser.add_argument("--split", default="validation", help="HF dataset split (default: validation)")
    parser.add_argument("--image-column", default=None, help="HF dataset image column (default: auto-detect)")
    parser.add_argument("--resolution", type=int_at_least(8), default=256, help="center-crop side after resizing (default: 256)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=8, help="images per model call (default: 8)")
    parser.add_argument("--max-images", type=int_at_least(min_images), default=None, help="use at most this many images")
    parser.add_argument("--seed", type=int, default=0, help="seed of posterior samples (default: 0)")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1... (default: cuda when available)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="autocast dtype of the VAE (metrics always run in float32)")
