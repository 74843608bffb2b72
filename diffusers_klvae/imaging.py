"""Pixel conventions and picture helpers shared by data, training, evaluation and latent tools.

The one convention of the package: a model-side image is a float tensor in **[-1, 1]**, shape
(B, 3, H, W) or (3, H, W), RGB. Everything a person sees (PIL images, PNG grids) is uint8 in [0, 255].
``to_uint8`` is the only place where [-1, 1] becomes [0, 255]: ``round((x + 1) * 127.5)`` clamped,
which is also the quantization of the evaluation protocol.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

ERROR_GAIN = 4.0  # amplified-error panels: |x - x_rec| * gain, so small errors are visible


def load_image(path: str | os.PathLike) -> Image.Image:
    """path -> RGB PIL image (EXIF orientation applied). Raises ``ValueError`` naming the file if unreadable."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {err}") from err


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
