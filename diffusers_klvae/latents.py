"""Latent-space tools: images to latents and back, the two latent spaces (raw, as the VAE encodes; diffusion space,
as a diffusion model sees them), attribute directions, interpolation and prior samples. Masks live in
``latent_masks``, previews in ``latent_preview``.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .imaging import image_grid, to_pil, to_tensor
from .latent_masks import check_size

SLERP_PARALLEL_EPS = 1e-4  # |cos| above 1 - eps: vectors are (anti)parallel, slerp degenerates to lerp


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


@torch.no_grad()
def encode_images(vae, images, *, sample: bool = False, generator: torch.Generator | None = None, batch_size: int = 8) -> torch.Tensor:
    """Images (see :func:`images_to_tensor`) -> raw latents (B, C, H/f, W/f), float32 on the model's device.

    Args:
        sample (`bool`, *optional*, defaults to `False`): draw from the posterior instead of taking its mean.
        generator (`torch.Generator`, *optional*): for ``sample=True``.
        batch_size (`int`, *optional*, defaults to 8): images per encoder call.
    """
    x = images_to_tensor(images)
    check_size(vae, *x.shape[-2:], "image")
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
        column = lambda v: torch.tensor(v, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)  # noqa: E731
        return column(mean), column(std)
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
    mix = torch.lerp if method == "lerp" else slerp
    return torch.stack([mix(latents_a, latents_b, i / (steps - 1)) for i in range(steps)])


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


def sample_prior(vae, n: int, height: int, width: int, generator: torch.Generator | None = None, temperature: float = 1.0,
                 *, grid_path: str | os.PathLike | None = None) -> list[Image.Image]:
    """Decode ``n`` samples of the prior: ``decode(z / scaling_factor + shift_factor)``, ``z ~ N(0, I)``.

    ``z`` lives in diffusion space (:func:`scale_latents`); the scaling is undone exactly once before decoding. A VAE
    whose ``scaling_factor`` was never fitted (see ``klvae stats``) gives washed-out or saturated samples.

    Args:
        n, height, width: number and pixel size of the samples (multiples of the downsampling factor).
        generator (`torch.Generator`, *optional*): for reproducible samples; ``z`` is drawn on its device (the CPU
            by default), so a seed gives the same samples on every device.
        temperature (`float`, *optional*, defaults to 1.0): std multiplier of ``z``.
        grid_path (*optional*): also write the samples as one PNG grid.

    Returns:
        list of ``n`` PIL images.
    """
    factor = check_size(vae, height, width, "sample")
    shape = (n, vae.config.latent_channels, height // factor, width // factor)
    z = torch.randn(shape, generator=generator, device=generator.device if generator is not None else "cpu") * temperature
    images = to_pil(decode_latents(vae, unscale_latents(vae, z)).cpu())
    if grid_path is not None:
        save_grid(images, grid_path, columns=min(n, 8))
    return images
