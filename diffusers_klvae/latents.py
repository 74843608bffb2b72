"""Latent-space tools: masks in latent space, attribute directions, interpolation, prior samples, previews.

Conventions (the whole module follows them):

- **Masks: 1 = keep, 0 = hole.** A mask multiplies what it masks, exactly like the model's
  ``forward(..., latent_mask=...)``. Pixel masks are (B, 1, H, W) (or (H, W), PIL, numpy), latent masks
  (B, 1, H/f, W/f) with f the model's downsampling factor. Masks from diffusers inpainting pipelines use the
  opposite convention (white = area to repaint): pass ``invert=True`` to :func:`mask_to_latent`.
- **Fill values.** Holes are filled with ``fill`` (default 0.0) in the space of what is masked: raw latents
  (what ``vae.encode(x).latent_dist`` gives, before any ``scaling_factor``) get 0.0, which is what the model's
  ``latent_mask`` multiplication produces; [-1, 1] pixels get 0.0 too, i.e. mid-gray (127.5 / 255).
- **Latent spaces.** "raw" latents are the VAE's own; "diffusion-space" latents are what a diffusion model
  sees, ``(raw - shift_factor) * scaling_factor`` (or per-channel ``(raw - latents_mean) / latents_std *
  scaling_factor`` when the config has ``latents_mean``/``latents_std``). :func:`scale_latents` and
  :func:`unscale_latents` are the only conversions. Prior samples ``N(0, I)`` live in diffusion space.
- **Images** are [-1, 1] tensors (B, 3, H, W) or PIL images (see :mod:`diffusers_klvae.imaging`).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .imaging import image_grid, to_pil, to_tensor

logger = logging.getLogger(__name__)

MASK_MODES = ("any", "all", "area")
MASK_KINDS = ("boxes", "strokes")
DEFAULT_FILL = 0.0  # raw latents: what `latent_mask` multiplication gives; pixels: mid-gray in [-1, 1]
SLERP_PARALLEL_EPS = 1e-4  # |cos| above 1 - eps: vectors are (anti)parallel, slerp degenerates to lerp


# ----------------------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------------------


def downsampling_factor(vae_or_factor) -> int:
    """A VAE (``KLVAE`` or diffusers ``AutoencoderKL``) or an int -> the spatial downsampling factor."""
    if isinstance(vae_or_factor, (int, np.integer)) and not isinstance(vae_or_factor, bool):
        factor = int(vae_or_factor)
    elif hasattr(vae_or_factor, "downsampling_factor"):
        factor = int(vae_or_factor.downsampling_factor)
    elif hasattr(vae_or_factor, "config") and "block_out_channels" in vae_or_factor.config:
        # diffusers AutoencoderKL: one 2x downsample between consecutive encoder levels
        factor = 2 ** (len(vae_or_factor.config.block_out_channels) - 1)
    else:
        raise ValueError(f"expected a VAE or a positive int downsampling factor, got {type(vae_or_factor).__name__}")
    if factor < 1:
        raise ValueError(f"downsampling factor must be >= 1, got {factor}")
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
    if height % factor or width % factor:
        raise ValueError(f"mask size {height}x{width} is not a multiple of the downsampling factor {factor}")
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
    keep = 1.0 - holes
    if grid > 1:
        keep = keep.repeat_interleave(grid, dim=-2).repeat_interleave(grid, dim=-1)
    return keep.to(device) if device is not None else keep


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


# ----------------------------------------------------------------------------------------------------------
# images <-> latents, latent spaces
# ----------------------------------------------------------------------------------------------------------


def images_to_tensor(images) -> torch.Tensor:
    """A PIL image, a list of same-size PIL images, or a [-1, 1] tensor (3, H, W) / (B, 3, H, W) -> (B, 3, H, W)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        tensor = images[None] if images.ndim == 3 else images
    elif isinstance(images, Sequence) and images and all(isinstance(img, Image.Image) for img in images):
        sizes = {img.size for img in images}
        if len(sizes) > 1:
            raise ValueError(f"images must share one size, got {sorted(sizes)} (resize_and_crop them first)")
        tensor = torch.stack([to_tensor(img) for img in images])
    else:
        raise ValueError("expected a PIL image, a non-empty list of PIL images, or a (B, 3, H, W) tensor in [-1, 1]")
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(tensor.shape)}")
    return tensor


def _check_size(vae, height: int, width: int, what: str) -> int:
    factor = downsampling_factor(vae)
    if height % factor or width % factor:
        raise ValueError(f"{what} size {height}x{width} is not a multiple of the downsampling factor {factor}")
    return factor


@torch.no_grad()
def encode_images(vae, images, *, sample: bool = False, generator: torch.Generator | None = None, batch_size: int = 8) -> torch.Tensor:
    """Images (see :func:`images_to_tensor`) -> raw latents (B, C, H/f, W/f), float32 on the model's device.

    Args:
        sample (`bool`, *optional*, defaults to `False`): draw from the posterior instead of taking its mean.
        generator (`torch.Generator`, *optional*): for ``sample=True``.
        batch_size (`int`, *optional*, defaults to 8): images per encoder call.
    """
    x = images_to_tensor(images)
    _check_size(vae, *x.shape[-2:], "image")
    chunks = []
    for batch in x.split(batch_size):
        posterior = vae.encode(batch.to(device=vae.device, dtype=vae.dtype)).latent_dist
        chunks.append((posterior.sample(generator=generator) if sample else posterior.mean).float())
    return torch.cat(chunks)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """Raw latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1], float32 (clamped)."""
    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise ValueError(f"expected latents of shape (B, {vae.config.latent_channels}, h, w), got {tuple(latents.shape)}")
    chunks = [vae.decode(z.to(device=vae.device, dtype=vae.dtype)).sample.float().clamp(-1, 1) for z in latents.split(batch_size)]
    return torch.cat(chunks)


def _latent_stats(vae, latents: torch.Tensor):
    """(mean, std) that take raw latents to diffusion space before ``* scaling_factor``, broadcastable."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:  # per-channel statistics (diffusers SDXL / SD3-style pipelines)
        shape = (1, -1, 1, 1)
        return (torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(shape),
                torch.tensor(std, dtype=latents.dtype, device=latents.device).view(shape))
    return (getattr(config, "shift_factor", None) or 0.0), 1.0


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """raw -> diffusion space: ``(z - shift) / std * scaling_factor`` (shift/std from the config, default 0/1)."""
    shift, std = _latent_stats(vae, latents)
    return (latents - shift) / std * vae.config.scaling_factor


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """diffusion space -> raw: ``z / scaling_factor * std + shift``, the inverse of :func:`scale_latents`."""
    shift, std = _latent_stats(vae, latents)
    return latents / vae.config.scaling_factor * std + shift


def save_grid(images, path: str | os.PathLike, *, columns: int | None = None) -> str:
    """Write PIL images (a flat list, laid out in ``columns``, or a list of rows) as one PNG grid; returns the path."""
    if images and isinstance(images[0], Image.Image):
        columns = columns or len(images)
        rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    else:
        rows = images
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image_grid(rows).save(path)
    return os.fspath(path)


# ----------------------------------------------------------------------------------------------------------
# attribute directions, interpolation, prior samples
# ----------------------------------------------------------------------------------------------------------


def attribute_direction(vae, with_images, without_images, *, normalize: bool = False, batch_size: int = 8) -> torch.Tensor:
    """Latent direction of an attribute: mean posterior mean of ``with_images`` minus that of ``without_images``.

    Args:
        with_images, without_images: images with / without the attribute (see :func:`images_to_tensor`);
            all of one size, a multiple of the downsampling factor.
        normalize (`bool`, *optional*, defaults to `False`): divide by the L2 norm, so ``strength`` in
            :func:`edit` is a distance in raw latent units.
        batch_size (`int`, *optional*, defaults to 8): images per encoder call.

    Returns:
        raw-latent direction (C, h, w), float32.
    """
    with_mean = encode_images(vae, with_images, batch_size=batch_size).mean(dim=0)
    without_mean = encode_images(vae, without_images, batch_size=batch_size).mean(dim=0)
    if with_mean.shape != without_mean.shape:
        raise ValueError(f"both sets must have one image size, got latents {tuple(with_mean.shape)} and {tuple(without_mean.shape)}")
    direction = with_mean - without_mean  # (C, h, w)
    if normalize:
        direction = direction / direction.norm().clamp_min(1e-12)
    return direction


def edit(vae, images, direction: torch.Tensor, strength: float = 1.0, *, grid_path: str | os.PathLike | None = None):
    """Move images along a latent direction: ``decode(mean(encode(x)) + strength * direction)``.

    Args:
        images: a PIL image, a list of them, or a [-1, 1] tensor (B, 3, H, W).
        direction: raw-latent direction (C, h, w) from :func:`attribute_direction` (or anything that
            broadcasts against the latents, e.g. (C, 1, 1)).
        strength (`float`, *optional*, defaults to 1.0): negative values remove the attribute.
        grid_path (*optional*): also write a PNG with one row per image: original | edited.

    Returns:
        a PIL image for a single PIL input, else a list of PIL images.
    """
    latents = encode_images(vae, images)
    direction = direction.to(latents)
    try:
        edited = latents + strength * direction
    except RuntimeError as err:
        raise ValueError(f"direction of shape {tuple(direction.shape)} does not fit latents {tuple(latents.shape)}") from err
    frames = to_pil(decode_latents(vae, edited).cpu())
    if grid_path is not None:
        originals = to_pil(images_to_tensor(images).float().clamp(-1, 1).cpu())
        save_grid([[a, b] for a, b in zip(originals, frames)], grid_path)
    return frames[0] if isinstance(images, Image.Image) else frames


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two same-shape tensors, t in [0, 1]; t = 0 gives ``a``, t = 1 gives ``b``.

    4-D tensors are interpolated per batch item, anything else as one flat vector. Where the two vectors
    are (nearly) parallel the angle is undefined and this falls back to linear interpolation.
    """
    batch = a.shape[0] if a.ndim == 4 else 1
    flat_a, flat_b = a.reshape(batch, -1).double(), b.reshape(batch, -1).double()  # (B, N)
    cos = F.cosine_similarity(flat_a, flat_b, dim=1).clamp(-1, 1)  # (B,)
    theta = torch.acos(cos)
    parallel = cos.abs() > 1 - SLERP_PARALLEL_EPS
    sin_theta = torch.where(parallel, torch.ones_like(theta), torch.sin(theta))
    w_a = torch.where(parallel, torch.full_like(theta, 1 - t), torch.sin((1 - t) * theta) / sin_theta)[:, None]
    w_b = torch.where(parallel, torch.full_like(theta, t), torch.sin(t * theta) / sin_theta)[:, None]
    return (w_a * flat_a + w_b * flat_b).to(a.dtype).view_as(a)


def interpolate_latents(latents_a: torch.Tensor, latents_b: torch.Tensor, steps: int, method: str = "slerp") -> torch.Tensor:
    """``steps`` latents from ``latents_a`` to ``latents_b`` (both ends included), stacked on a new first dim.

    Args:
        latents_a, latents_b: same-shape tensors (e.g. (C, h, w) or (1, C, h, w)).
        steps (`int`): number of frames, >= 2.
        method (`str`, *optional*, defaults to ``"slerp"``): ``"slerp"`` (keeps the norm of Gaussian-like
            latents, so middle frames stay in-distribution) or ``"lerp"``.
    """
    if method not in ("slerp", "lerp"):
        raise ValueError(f"method must be 'slerp' or 'lerp', got {method!r}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    if latents_a.shape != latents_b.shape:
        raise ValueError(f"latents differ in shape: {tuple(latents_a.shape)} vs {tuple(latents_b.shape)}")
    ts = [i / (steps - 1) for i in range(steps)]
    if method == "lerp":
        return torch.stack([torch.lerp(latents_a, latents_b, t) for t in ts])
    return torch.stack([slerp(latents_a, latents_b, t) for t in ts])


def interpolate(vae, image_a, image_b, steps: int = 8, method: str = "slerp", *, grid_path: str | os.PathLike | None = None) -> list[Image.Image]:
    """Decoded frames between two images' latents (posterior means), both ends included.

    Interpolation runs in diffusion space (:func:`scale_latents`), so slerp turns around the latents' centre
    (``shift_factor`` / ``latents_mean``) rather than around raw zero.

    Args:
        image_a, image_b: PIL images or [-1, 1] tensors (3, H, W) / (1, 3, H, W) of one size.
        steps (`int`, *optional*, defaults to 8): number of frames.
        method (`str`, *optional*, defaults to ``"slerp"``): ``"slerp"`` or ``"lerp"``.
        grid_path (*optional*): also write the frames as one PNG row.

    Returns:
        list of ``steps`` PIL images.
    """
    a, b = images_to_tensor(image_a), images_to_tensor(image_b)
    if len(a) != 1 or len(b) != 1 or a.shape != b.shape:
        raise ValueError(f"expected two single images of one size, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    latents = encode_images(vae, torch.cat([a, b]))
    z_a, z_b = scale_latents(vae, latents).unbind(0)
    frames_z = interpolate_latents(z_a, z_b, steps, method)  # (steps, C, h, w)
    frames = to_pil(decode_latents(vae, unscale_latents(vae, frames_z)).cpu())
    if grid_path is not None:
        save_grid(frames, grid_path)
    return frames


def sample_prior_latents(vae, n: int, height: int, width: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Raw latents of prior samples: ``z ~ N(0, temperature² I)`` in diffusion space, unscaled once -> (n, C, h, w).

    ``z`` is drawn on the CPU (the generator's device), so a seed gives the same samples on every device.
    """
    factor = _check_size(vae, height, width, "sample")
    shape = (n, vae.config.latent_channels, height // factor, width // factor)
    z = torch.randn(shape, generator=generator, device=generator.device if generator is not None else "cpu") * temperature
    return unscale_latents(vae, z)


def sample_prior(
    vae,
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    *,
    grid_path: str | os.PathLike | None = None,
) -> list[Image.Image]:
    """Decode ``n`` samples of the prior: ``decode(z / scaling_factor + shift_factor)``, ``z ~ N(0, I)``.

    ``z`` lives in diffusion space, where the model's ``scaling_factor`` (and shift / per-channel stats) make
    the latents roughly unit-variance; the scaling is undone exactly once before decoding. A VAE whose
    ``scaling_factor`` was never fitted (see ``klvae stats``) gives washed-out or saturated samples.

    Args:
        n, height, width: number and pixel size of the samples (multiples of the downsampling factor).
        generator (`torch.Generator`, *optional*): CPU generator for reproducible samples.
        temperature (`float`, *optional*, defaults to 1.0): std multiplier of ``z``.
        grid_path (*optional*): also write the samples as one PNG grid.

    Returns:
        list of ``n`` PIL images.
    """
    latents = sample_prior_latents(vae, n, height, width, generator=generator, temperature=temperature)
    images = to_pil(decode_latents(vae, latents).cpu())
    if grid_path is not None:
        save_grid(images, grid_path, columns=min(n, 8))
    return images


# ----------------------------------------------------------------------------------------------------------
# latent previews
# ----------------------------------------------------------------------------------------------------------


def _as_factors(factors_or_vae) -> torch.Tensor:
    factors = factors_or_vae
    if hasattr(factors_or_vae, "config"):
        factors = getattr(factors_or_vae.config, "latent_rgb_factors", None)
        if factors is None:
            raise ValueError("the model has no `latent_rgb_factors` in its config: fit one with fit_latent_rgb_map (klvae preview --fit)")
    factors = torch.as_tensor(factors, dtype=torch.float32)
    if factors.ndim != 2 or factors.shape[1] != 3 or factors.shape[0] < 2:
        raise ValueError(f"latent_rgb_factors must be (latent_channels + 1) rows of 3 (last row = bias), got {tuple(factors.shape)}")
    return factors


def latents_to_rgb(latents: torch.Tensor, factors_or_vae) -> torch.Tensor:
    """Fast RGB preview of raw latents: a per-pixel linear map, (B, C, h, w) -> (B, 3, h, w) in [-1, 1].

    Args:
        latents: raw latents (diffusion-space latents of a pipeline: :func:`unscale_latents` first).
        factors_or_vae: a (C + 1, 3) map (rows = latent channels, last row = bias; a tensor or the list
            of lists stored as config key ``latent_rgb_factors``), or a VAE whose config carries one.
    """
    factors = _as_factors(factors_or_vae).to(latents.device)
    if latents.ndim != 4 or latents.shape[1] != factors.shape[0] - 1:
        raise ValueError(f"expected latents (B, {factors.shape[0] - 1}, h, w) for this preview map, got {tuple(latents.shape)}")
    weight, bias = factors[:-1], factors[-1]
    rgb = torch.einsum("bchw,cr->brhw", latents.float(), weight) + bias.view(1, 3, 1, 1)
    return rgb.clamp(-1, 1)


def fit_latent_rgb_map(latents: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Least-squares fit of the preview map from raw latents to their images area-downsampled to latent size.

    Args:
        latents: raw latents (B, C, h, w).
        images: the matching [-1, 1] images (B, 3, H, W), H/h = W/w an integer factor.

    Returns:
        (C + 1, 3) float32 map (last row = bias), for :func:`latents_to_rgb`; store it in a model with
        ``vae.register_to_config(latent_rgb_factors=factors.tolist())`` (see :func:`fit_preview_map`).
    """
    if latents.ndim != 4 or images.ndim != 4 or images.shape[1] != 3 or len(latents) != len(images):
        raise ValueError(f"expected latents (B, C, h, w) and images (B, 3, H, W), got {tuple(latents.shape)} and {tuple(images.shape)}")
    factor = images.shape[-1] // latents.shape[-1]
    if factor < 1 or images.shape[-2:] != (latents.shape[-2] * factor, latents.shape[-1] * factor):
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not an integer multiple of latent size {tuple(latents.shape[-2:])}")
    targets = F.avg_pool2d(images.double(), factor) if factor > 1 else images.double()  # (B, 3, h, w)
    inputs = latents.double().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (N, C)
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype)], dim=1)  # (N, C + 1): bias column
    outputs = targets.permute(0, 2, 3, 1).reshape(-1, 3).to(inputs.device)  # (N, 3)
    return torch.linalg.lstsq(inputs.cpu(), outputs.cpu(), driver="gelsd").solution.float()


def fit_preview_map(vae, images, *, store: bool = True, batch_size: int = 8) -> torch.Tensor:
    """Encode ``images`` (posterior means), fit the preview map and (``store=True``) keep it in the model's
    config as ``latent_rgb_factors``, so ``save_pretrained`` writes it to config.json. Returns the map."""
    x = images_to_tensor(images)
    factors = fit_latent_rgb_map(encode_images(vae, x, batch_size=batch_size).cpu(), x.float())
    if store:
        vae.register_to_config(latent_rgb_factors=factors.tolist())
    return factors
