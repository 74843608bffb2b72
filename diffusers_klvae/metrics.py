"""Reconstruction metrics as pure functions on uint8 image batches (B, 3, H, W), the pictures a user would save
(``imaging.to_uint8``): PSNR, SSIM, LPIPS, rFID, region PSNR. ``evaluation`` runs them with its protocol and
re-exports them."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

PEAK = 255.0  # PSNR / SSIM data range: metrics are computed on uint8 values
SSIM_KERNEL_SIZE, SSIM_SIGMA = 11, 1.5  # Wang et al. 2004, the setting every VAE paper reports
PER_IMAGE_KEYS = {  # metric -> the per-image values it produces
    "psnr": ("psnr",),
    "ssim": ("ssim",),
    "lpips": ("lpips",),
    "rfid": (),  # set-level
    "masked_psnr": ("masked_psnr_kept", "masked_psnr_hole"),
}


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two image batches of the same shape (B, C, H, W), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != torch.uint8 or y.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (quantize with imaging.to_uint8 first), got {x.dtype} and {y.dtype}")


@torch.no_grad()
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 images (B, C, H, W) in [0, 255]: ``10 log10(255² / MSE)`` over C×H×W.

    Returns float64 (B,); identical images give ``+inf``.
    """
    _check_pair(x, y)
    mse = (x.double() - y.double()).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(PEAK**2 / mse)  # mse == 0 -> inf, no warning


@torch.no_grad()
def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of uint8 images (B, C, H, W) in [0, 255], torchmetrics with Gaussian 11, σ 1.5, data_range 255.

    Returns float32 (B,); identical images give 1.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(x, y)
    return structural_similarity_index_measure(
        x.float(), y.float(), gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL_SIZE,
        data_range=PEAK, reduction="none",
    )


@torch.no_grad()
def lpips_distance(x: torch.Tensor, y: torch.Tensor, lpips_model: nn.Module) -> torch.Tensor:
    """Per-image LPIPS of uint8 images (B, 3, H, W), mapped to [-1, 1] for the network (``perceptual.load_lpips``).

    Returns float32 (B,); identical images give 0.
    """
    _check_pair(x, y)
    device = next(lpips_model.parameters()).device
    to_signed = lambda u: u.to(device).float() / 127.5 - 1.0  # noqa: E731 - uint8 -> [-1, 1], the inverse of to_uint8
    return lpips_model(to_signed(x), to_signed(y)).reshape(x.shape[0]).float()


def make_fid_metric(feature_extractor: nn.Module):
    """torchmetrics ``FrechetInceptionDistance`` over ``feature_extractor`` (uint8 images -> features).

    ``update(uint8_images, real=True/False)`` streams float64 sums; ``compute()`` gives the Fréchet distance.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=feature_extractor, normalize=False)


@torch.no_grad()
def rfid(originals: Iterable[torch.Tensor], reconstructions: Iterable[torch.Tensor], feature_extractor: nn.Module) -> float:
    """Fréchet distance between two sets of uint8 image batches (B, 3, H, W), e.g. originals vs reconstructions.

    Args:
        originals, reconstructions: iterables of uint8 batches (at least 2 images each).
        feature_extractor: ``fid.load_fid_inception()`` for a real rFID (the tests use a small random CNN).
    """
    metric = make_fid_metric(feature_extractor)
    for batch in originals:
        metric.update(batch, real=True)
    for batch in reconstructions:
        metric.update(batch, real=False)
    return float(metric.compute())


@torch.no_grad()
def region_psnr(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of uint8 images over the pixels where ``region`` (B, 1, H, W) is 1; NaN for an empty region."""
    _check_pair(x, y)
    weight = region.to(x.device).double().expand_as(x)
    mse = ((x.double() - y.double()).square() * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3))
    return 10.0 * torch.log10(PEAK**2 / mse)
