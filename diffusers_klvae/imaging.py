"""Pixel conventions, the package's one image reader, and picture helpers.

The one convention of the package: a model-side image is a float tensor in **[-1, 1]**, shape
(B, 3, H, W) or (3, H, W), RGB. Everything a person sees (PIL images, PNG grids) is uint8 in [0, 255].
``to_uint8`` is the only place where [-1, 1] becomes [0, 255]: ``round((x + 1) * 127.5)`` clamped,
which is also the quantization of the evaluation protocol.

The one reader (training, evaluation, latent statistics and the ``klvae`` command all use it):
``list_image_paths`` (a folder -> every image-named path, readable or not) -> ``read_image_bytes`` (regular
files only) -> ``decode_image`` (bytes -> 8-bit RGB). Whatever cannot become an image raises
:class:`UnreadableImage`, a ``ValueError`` whose ``reason`` is a short category that callers count; one bad file
is a counted skip, never an abort. Decoding rules:

- decompression bombs (more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels) are refused before decoding;
- EXIF orientation is applied;
- 16-bit and 32-bit grey (modes ``I;16``, ``I;16B``, ``I;16L``, ``I``) are read as 0..65535 and scaled to
  ``round(v / 257)`` (65535 -> 255); float (``F``) is read as 0..1 and scaled to ``round(255 v)``; both clipped;
- transparency (RGBA, LA, PA, palette or tRNS) is composited on **white** (``ALPHA_BACKGROUND``):
  ``round(a * rgb + (1 - a) * 255)`` with ``a = alpha / 255``, so a colour hidden under alpha 0 never shows;
- truncated files are refused (``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` stays off: half-grey images are bad targets).
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .cli_support import writing

ERROR_GAIN = 4.0  # amplified-error panels: |x - x_rec| * gain, so small errors are visible
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ALPHA_BACKGROUND = (255, 255, 255)  # white: what a viewer shows behind a transparent PNG on a page
_DEEP_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}  # mode -> white
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class UnreadableImage(ValueError):
    """An input that is not a usable image. ``reason``: short category for counts (e.g. ``"dangling symlink"``);
    the message names the file and the detail."""

    def __init__(self, name: str, reason: str, detail: str = ""):
        self.name, self.reason = name, reason
        super().__init__(f"{name!r}: {reason}" + (f" ({detail})" if detail else ""))


def list_image_paths(folder: str | os.PathLike) -> list[str]:
    """Every path under ``folder`` whose name ends in ``IMAGE_EXTENSIONS``, recursively, in sorted order.

    Included even when they cannot be read (dangling symlinks, FIFOs, folders named ``x.jpg``): the reader
    refuses them with a reason, so they are counted instead of silently vanishing. Folders are descended (a
    folder named like an image too); symlinked folders are not followed (no loops). Raises ``FileNotFoundError``
    when ``folder`` is not a folder.
    """
    root = os.fspath(folder)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"not a folder: {root!r}")
    found = []
    for parent, dirs, files in os.walk(root):  # symlinked folders are listed in dirs but not entered (no loops)
        found += [os.path.join(parent, n) for n in (*dirs, *files) if n.lower().endswith(IMAGE_EXTENSIONS)]
    # sort by path components, the order of a recursive sorted listing (and of datasets' imagefolder)
    return sorted(found, key=lambda p: os.path.relpath(p, root).split(os.sep))


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """A local file's bytes; ``UnreadableImage`` for a dangling symlink, a missing path, a folder, a FIFO/socket/
    device (never opened: reading a FIFO would block) or a read error."""
    name = os.fspath(path)
    try:
        mode = os.stat(name).st_mode
    except FileNotFoundError:
        raise UnreadableImage(name, "dangling symlink" if os.path.islink(name) else "no such file") from None
    except OSError as err:
        raise UnreadableImage(name, "unreadable file", err.strerror or str(err)) from err
    if stat.S_ISDIR(mode):
        raise UnreadableImage(name, "a folder named like an image")
    if not stat.S_ISREG(mode):
        raise UnreadableImage(name, "not a regular file", "FIFO, socket or device")
    try:
        with open(name, "rb") as f:
            return f.read()
    except OSError as err:
        raise UnreadableImage(name, "unreadable file", err.strerror or str(err)) from err


def decode_image(data: bytes, *, name: str) -> Image.Image:
    """Encoded bytes -> 8-bit RGB PIL image by the rules of this module's docstring; ``UnreadableImage`` if not."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; decoding such a file can exhaust memory, so refuse
            # it here by size (read from the header), which is thread-safe, unlike turning the warning into an error
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise UnreadableImage(name, "decompression bomb",
                                      f"{img.width}x{img.height} > {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS)")
            img.load()  # the full decode: truncation is caught here
            return to_rgb(ImageOps.exif_transpose(img), name=name)
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # PIL's own refusal (above twice the
        # limit), or its warning when warnings are errors (python -W error)
        raise UnreadableImage(name, "decompression bomb", str(err)) from err
    except Image.UnidentifiedImageError as err:  # its message names an anonymous BytesIO; say what it means
        raise UnreadableImage(name, "undecodable", "not an image format PIL recognises") from err
    except Exception as err:  # noqa: BLE001 -- untrusted bytes: PIL's plugins raise EOFError, struct.error, IndexError...
        raise UnreadableImage(name, "undecodable", f"{type(err).__name__}: {err}") from err


def load_image(path: str | os.PathLike) -> Image.Image:
    """path -> 8-bit RGB PIL image (the module's reader). Raises ``UnreadableImage`` (a ``ValueError``) naming the file."""
    return decode_image(read_image_bytes(path), name=os.fspath(path))


def to_rgb(img: Image.Image, *, name: str = "<image>") -> Image.Image:
    """Any PIL image -> 8-bit RGB: deep grey scaled to 8 bits, transparency composited on ``ALPHA_BACKGROUND``.
    ``UnreadableImage`` (naming ``name``) for NaN/Inf pixels of a float image: no colour stands for them."""
    if img.mode in _DEEP_MODES:
        values = np.asarray(img, dtype=np.float64) / _DEEP_MODES[img.mode]
        if not np.isfinite(values).all():
            raise UnreadableImage(name, "non-finite pixels", f"{int((~np.isfinite(values)).sum())} NaN/Inf values")
        grey = np.floor(np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + np.asarray(ALPHA_BACKGROUND, dtype=np.float64) * (1.0 - alpha)
        return Image.fromarray(np.floor(rgb + 0.5).astype(np.uint8), "RGB")
    return img.convert("RGB")


def resize_and_crop(img: Image.Image, resolution: int, center_crop: bool = True, generator: torch.Generator | None = None,
                    zoom: float = 1.0) -> Image.Image:
    """Resize the shorter side to ``zoom * resolution`` (bicubic; never above the photo's own size unless that is below
    ``resolution``), then crop a ``resolution``² square (center or random)."""
    w, h = img.size
    side = max(resolution, min(round(resolution * zoom), min(w, h)))
    scale = side / min(w, h)
    if scale != 1:
        img = img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    return img.crop((left, top, left + resolution, top + resolution))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float tensor -> uint8 tensor of the same shape: round((x + 1) * 127.5), clamped to [0, 255]."""
    return ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_pil(x: torch.Tensor) -> Image.Image | list[Image.Image]:
    """[-1, 1] tensor (3, H, W) -> PIL image; (B, 3, H, W) -> list of PIL images."""
    if x.ndim == 4:
        return [to_pil(item) for item in x]
    return Image.fromarray(to_uint8(x).permute(1, 2, 0).cpu().numpy())


def error_image(x: torch.Tensor, x_rec: torch.Tensor, gain: float = ERROR_GAIN) -> torch.Tensor:
    """Amplified absolute error of two [-1, 1] images, mapped back to [-1, 1] (black = no error)."""
    err = (x.float() - x_rec.float()).abs().mean(dim=-3, keepdim=True) * gain  # (.., 1, H, W) in [0, 2 * gain]
    return (err.clamp(0, 2) - 1).expand_as(x)


def image_grid(rows: Sequence[Sequence[Image.Image]], pad: int = 2, background=(255, 255, 255)) -> Image.Image:
    """Rows of PIL images -> one grid image (cells sized by the largest image)."""
    cell_w = max(img.width for row in rows for img in row)
    cell_h = max(img.height for row in rows for img in row)
    n_cols = max(len(row) for row in rows)
    grid = Image.new("RGB", (n_cols * (cell_w + pad) + pad, len(rows) * (cell_h + pad) + pad), background)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img, (pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    return grid


def reconstruction_grid(originals: torch.Tensor, reconstructions: Iterable[torch.Tensor], gain: float = ERROR_GAIN) -> Image.Image:
    """One row per image: original | each reconstruction | each amplified error. Tensors are (B, 3, H, W) in [-1, 1]."""
    reconstructions = list(reconstructions)
    rows = []
    for i, x in enumerate(originals):
        recs = [rec[i] for rec in reconstructions]
        cells = [x, *recs, *(error_image(x, rec, gain) for rec in recs)]
        rows.append([to_pil(cell.cpu()) for cell in cells])
    return image_grid(rows)


def pyplot():
    """matplotlib's pyplot with the Agg backend (files only: no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """A matplotlib figure -> PNG at ``path`` (its folder created; a full disk is named), then closed."""
    fig.tight_layout()
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path
