"""Latent previews: the per-pixel linear map from raw latents to RGB that UIs show during sampling, and its fit.

The map, config key ``latent_rgb_factors``, is ``latent_channels + 1`` rows of 3 numbers (rows = latent channels,
last row = bias: ComfyUI's layout plus a bias row). It maps **raw** latents, so a refitted ``scaling_factor``
leaves it valid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    targets = F.avg_pool2d(images.double().cpu(), factor)  # (B, 3, h, w)
    inputs = latents.double().cpu().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (N, C)
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype)], dim=1)  # (N, C + 1): bias column
    outputs = targets.permute(0, 2, 3, 1).reshape(-1, 3)  # (N, 3)
    return torch.linalg.lstsq(inputs, outputs, driver="gelsd").solution.float()  # gelsd: CPU only


def fit_preview_map(vae, images, *, store: bool = True, batch_size: int = 8) -> torch.Tensor:
    """Encode ``images`` (posterior means), fit the preview map over every latent pixel and (``store=True``) keep it in
    the model's config as ``latent_rgb_factors``, so ``save_pretrained`` writes it to config.json. Returns the map.

    ``images``: a batch (see ``latents.images_to_tensor``), or a list whose items (images or batches) may differ in size.
    """
    from .latents import encode_images, images_to_tensor

    batches = [images_to_tensor(x) for x in images] if isinstance(images, (list, tuple)) else [images_to_tensor(images)]
    latents = [encode_images(vae, x, batch_size=batch_size).cpu() for x in batches]
    pooled = [F.avg_pool2d(x.double(), x.shape[-1] // z.shape[-1]) for x, z in zip(batches, latents)]  # to latent size
    strip = lambda ts: torch.cat([t.transpose(0, 1).flatten(1)[None, :, None] for t in ts], dim=-1)  # noqa: E731 - (1, C, 1, every pixel)
    factors = fit_latent_rgb_map(strip(latents), strip(pooled))
    if store:
        vae.register_to_config(latent_rgb_factors=factors.tolist())
    return factors
