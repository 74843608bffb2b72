"""Masks in latent space: pixel masks to the latent grid and back, masked latents and images, random hole masks and
decoding from masked latents. **1 = keep, 0 = hole**, as in the model's ``forward(..., latent_mask=...)``; holes get
``fill`` (default 0.0: in raw latents what the ``latent_mask`` multiplication gives, in [-1, 1] pixels mid-gray).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .models.config import downsampling_factor_of

MASK_MODES = ("any", "all", "area")
MASK_KINDS = ("boxes", "strokes")
DEFAULT_FILL = 0.0  # raw latents: what `latent_mask` multiplication gives; pixels: mid-gray in [-1, 1]


def downsampling_factor(vae_or_factor) -> int:
    """A VAE (``KLVAE`` or diffusers ``AutoencoderKL``) or an int -> the spatial downsampling factor."""
    if hasattr(vae_or_factor, "downsampling_factor"):  # KLVAE, or a wrapper that says it
        return int(vae_or_factor.downsampling_factor)
    if hasattr(vae_or_factor, "config") and "block_out_channels" in vae_or_factor.config:
        return downsampling_factor_of(vae_or_factor.config)
    if not isinstance(vae_or_factor, (int, np.integer)) or isinstance(vae_or_factor, bool):
        raise ValueError(f"expected a VAE or a positive int downsampling factor, got {type(vae_or_factor).__name__}")
    if vae_or_factor < 1:
        raise ValueError(f"downsampling factor must be >= 1, got {vae_or_factor}")
    return int(vae_or_factor)


def check_size(vae_or_factor, height: int, width: int, what: str) -> int:
    factor = downsampling_factor(vae_or_factor)
    if height % factor or width % factor:
        raise ValueError(f"{what} size {width}x{height} (width x height) is not a multiple of the downsampling factor {factor}")
    return factor


def as_mask_tensor(mask) -> torch.Tensor:
    """A pixel or latent mask (PIL, numpy array or tensor; (H, W), (1, H, W), (B, H, W) or (B, 1, H, W)) ->
    float tensor (B, 1, H, W) with values in [0, 1].

    PIL images and uint8 arrays are read as 0..255 and divided by 255; bool becomes {0, 1}; float values
    must already lie in [0, 1]. PIL images in any mode are converted to grayscale ("L") first.
    """
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.array(mask))  # a copy: PIL-backed arrays are read-only
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"expected a mask as PIL image, numpy array or tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        mask = mask.float()
    elif mask.dtype == torch.uint8:
        mask = mask.float() / 255.0
    elif not mask.is_floating_point():
        raise ValueError(f"integer masks must be uint8 (0..255) or bool, got {mask.dtype}")
    if mask.ndim == 2:
        mask = mask[None, None]  # (1, 1, H, W)
    elif mask.ndim == 3:
        mask = mask[:, None]  # (B, H, W) -> (B, 1, H, W)
    elif mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"expected a mask of shape (H, W), (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    if mask.numel() and (mask.min() < 0 or mask.max() > 1):
        raise ValueError(f"mask values must lie in [0, 1] (1 = keep, 0 = hole), got [{mask.min():.3g}, {mask.max():.3g}]")
    return mask


def mask_to_latent(mask, vae_or_factor, mode: str = "any", *, invert: bool = False) -> torch.Tensor:
    """Map a pixel mask to the latent grid: (B, 1, H, W) -> (B, 1, H/f, W/f).

    Convention: **1 = keep, 0 = hole** (set ``invert=True`` for diffusers inpainting masks, where
    white/1 = the area to repaint). Each latent cell covers an f×f block of pixels; ``mode`` is the rule
    for a cell whose block is only partly a hole:

    - ``"any"`` (default): the cell is a hole if **any** of its pixels is a hole (pixels binarized at 0.5).
      The latent hole covers the pixel hole, so nothing of the hole's content leaks into kept latents:
      the safe choice for inpainting.
    - ``"all"``: the cell is a hole only if **all** its pixels are holes (the latent hole lies inside).
    - ``"area"``: the cell keeps the fraction of its pixels that are kept (mean of the mask, soft, in [0, 1]).

    On masks aligned to the latent grid (constant on every f×f block) the three modes agree and are exact.

    Args:
        mask: pixel mask, PIL / numpy / tensor, (H, W), (B, H, W) or (B, 1, H, W); H and W multiples of f.
        vae_or_factor: a VAE (its ``downsampling_factor``) or the factor as an int.
        mode (`str`, *optional*, defaults to ``"any"``): ``"any"``, ``"all"`` or ``"area"``, see above.
        invert (`bool`, *optional*, defaults to `False`): read the input as 1 = hole.

    Returns:
        float tensor (B, 1, H/f, W/f), values in {0, 1} (``"any"``/``"all"``) or [0, 1] (``"area"``).
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    factor = downsampling_factor(vae_or_factor)
    mask = as_mask_tensor(mask)
    if invert:
        mask = 1.0 - mask
    height, width = mask.shape[-2:]
    check_size(factor, height, width, "mask")
    if mode == "area":
        return F.avg_pool2d(mask, factor)
    # binarizing the block's min (max) equals the min (max) of the binarized block, without a full-size copy
    reduce = torch.amin if mode == "any" else torch.amax  # "any": one hole pixel makes a hole; "all": every one must
    block = reduce(mask.unflatten(-1, (width // factor, factor)), dim=-1)  # (B, 1, H, w)
    block = reduce(block.unflatten(-2, (height // factor, factor)), dim=-2)  # (B, 1, h, w)
    return (block >= 0.5).to(mask.dtype)


def latent_mask_to_pixels(latent_mask, vae_or_factor) -> torch.Tensor:
    """Latent mask (B, 1, h, w) -> pixel mask (B, 1, h*f, w*f), each cell repeated over its f×f block.

    This is the pixel region a masked latent can be asked to reconstruct: for aligned masks it equals the
    original pixel mask; use it to build training targets and evaluation regions for unaligned ones.
    """
    factor = downsampling_factor(vae_or_factor)
    latent_mask = as_mask_tensor(latent_mask)
    return latent_mask.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def _blend(x: torch.Tensor, mask: torch.Tensor, fill: float, what: str) -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(f"expected {what} of shape (B, C, H, W), got {tuple(x.shape)}")
    mask = as_mask_tensor(mask).to(device=x.device, dtype=x.dtype)
    if mask.shape[-2:] != x.shape[-2:] or mask.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {what} of shape {tuple(x.shape)}")
    if fill == 0:
        return x * mask  # the same arithmetic as the model's `latent_mask` multiplication
    return x * mask + fill * (1.0 - mask)


def apply_latent_mask(latents: torch.Tensor, latent_mask, fill: float = DEFAULT_FILL) -> torch.Tensor:
    """Mask latents: keep where the mask is 1, ``fill`` where it is 0 (soft masks blend linearly).

    ``latents * m + fill * (1 - m)``; with the default ``fill=0.0`` this is exactly ``latents * m``, what
    ``vae(x, latent_mask=m)`` does before decoding.

    Args:
        latents: raw latents (B, C, h, w), as given by ``vae.encode(x).latent_dist`` (not scaled).
        latent_mask: (B, 1, h, w) or (1, 1, h, w) in [0, 1], **1 = keep, 0 = hole** (see :func:`mask_to_latent`).
        fill (`float`, *optional*, defaults to 0.0): value given to holes, in raw latent units.

    Returns:
        tensor like ``latents``.
    """
    return _blend(latents, latent_mask, fill, "latents")


def apply_pixel_mask(images: torch.Tensor, pixel_mask, fill: float = DEFAULT_FILL) -> torch.Tensor:
    """Mask [-1, 1] images (B, 3, H, W): keep where the mask is 1, ``fill`` (default 0.0 = mid-gray) in holes.

    The target of mask-aware training and of masked PSNR: ``apply_pixel_mask(x, latent_mask_to_pixels(m, f))``.
    """
    return _blend(images, pixel_mask, fill, "images")


def random_pixel_mask(
    batch: int,
    height: int,
    width: int,
    kind: str = "boxes",
    generator: torch.Generator | None = None,
    *,
    grid: int = 1,
    max_shapes: int = 3,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random inpainting-style hole masks for mask-aware training, (B, 1, H, W) float, **1 = keep, 0 = hole**.

    Args:
        batch, height, width: output shape; ``height``/``width`` must be multiples of ``grid``.
        kind (`str`, *optional*, defaults to ``"boxes"``): ``"boxes"`` (1..max_shapes axis-aligned rectangles,
            each side 10-50 % of the image) or ``"strokes"`` (1..max_shapes thick random polylines, like
            brush strokes in inpainting UIs).
        generator (`torch.Generator`, *optional*): CPU generator for reproducible masks.
        grid (`int`, *optional*, defaults to 1): draw on a grid of ``grid``-pixel cells, so that hole edges
            fall on the latent grid when ``grid`` is the VAE's downsampling factor (then
            ``mask_to_latent`` is exact in every mode).
        max_shapes (`int`, *optional*, defaults to 3): most holes per image.
        device (*optional*): device of the returned tensor (masks are drawn on the CPU).

    Returns:
        float tensor (B, 1, H, W) in {0, 1}; every image has at least one hole and keeps some pixels.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
    if grid < 1 or height % grid or width % grid:
        raise ValueError(f"height and width ({height}x{width}) must be multiples of grid={grid}")
    h, w = height // grid, width // grid
    if h * w < 2:
        raise ValueError(f"a {height}x{width} mask on grid={grid} has {h * w} cell: no room for a hole and a kept part")
    draw = _draw_boxes if kind == "boxes" else _draw_strokes
    holes = torch.zeros(batch, 1, h, w)
    for i in range(batch):
        n_shapes = int(torch.randint(1, max_shapes + 1, (1,), generator=generator))
        while True:
            hole = draw(h, w, n_shapes, generator)
            if 0 < hole.sum() < h * w:  # at least one hole cell and one kept cell
                break
        holes[i, 0] = hole
    return latent_mask_to_pixels(1.0 - holes, grid).to(device)


def _uniform(generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _draw_boxes(h: int, w: int, n: int, generator) -> torch.Tensor:
    """(h, w) float with 1 inside ``n`` random rectangles."""
    hole = torch.zeros(h, w)
    for _ in range(n):
        bh = max(1, round(h * _uniform(generator, 0.1, 0.5)))
        bw = max(1, round(w * _uniform(generator, 0.1, 0.5)))
        top = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
        hole[top : top + bh, left : left + bw] = 1.0
    return hole


def _draw_strokes(h: int, w: int, n: int, generator) -> torch.Tensor:
    """(h, w) float with 1 on ``n`` thick random polylines (4-8 segments each)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    hole = torch.zeros(h, w, dtype=torch.bool)
    size = min(h, w)
    for _ in range(n):
        radius = max(0.5, size * _uniform(generator, 0.03, 0.08))
        y, x = _uniform(generator, 0, h - 1), _uniform(generator, 0, w - 1)
        angle = _uniform(generator, 0, 2 * math.pi)
        for _ in range(int(torch.randint(4, 9, (1,), generator=generator))):
            angle += _uniform(generator, -1.0, 1.0)  # a brush turns gently
            length = size * _uniform(generator, 0.1, 0.3)
            y2 = min(max(y + length * math.sin(angle), 0.0), h - 1.0)
            x2 = min(max(x + length * math.cos(angle), 0.0), w - 1.0)
            hole |= _segment_distance(ys, xs, (y, x), (y2, x2)) <= radius
            y, x = y2, x2
    return hole.float()


def _segment_distance(ys, xs, p, q) -> torch.Tensor:
    """Distance of every grid point (ys, xs) to the segment p-q."""
    dy, dx = q[0] - p[0], q[1] - p[1]
    length2 = dy * dy + dx * dx
    t = ((ys - p[0]) * dy + (xs - p[1]) * dx) / length2 if length2 > 0 else torch.zeros_like(ys)
    t = t.clamp(0, 1)
    return torch.hypot(ys - (p[0] + t * dy), xs - (p[1] + t * dx))


@torch.no_grad()
def masked_reconstruct(vae, images: torch.Tensor, pixel_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode from masked latents: images [-1, 1] (B, 3, H, W), ``pixel_mask`` (B, 1, H, W), 1 = keep, 0 = hole.

    Returns ``(decoded, target, region)``: the decoded image (float32), the pixel-masked target (holes mid-gray)
    and the pixel region (B, 1, H, W) of the latent mask, 1 = kept (what a masked latent can be asked for).
    """
    latent_mask = mask_to_latent(pixel_mask, vae)  # "any": a latent cell touching the hole is a hole
    weight = next(vae.parameters())
    images = images.to(device=weight.device, dtype=weight.dtype)
    z = apply_latent_mask(vae.encode(images).latent_dist.mode(), latent_mask)
    region = latent_mask_to_pixels(latent_mask, vae).to(images.device)
    return vae.decode(z).sample.float(), apply_pixel_mask(images.float(), region), region
