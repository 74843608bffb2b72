"""The diagonal Gaussian posterior q(z|x) of a KL autoencoder: diffusers' ``DiagonalGaussianDistribution``, with a
per-sample zero KL and NLL when deterministic."""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as _DiffusersPosterior


class DiagonalGaussianDistribution(_DiffusersPosterior):
    """N(mean, exp(logvar)) per latent element, built from the encoder's moments (B, 2C, h, w) = [mean | logvar]
    (logvar clamped to [-30, 20] as in LDM). A deterministic one's ``kl()``/``nll()`` are zeros of shape (B,) on the
    input's device and dtype, as the stochastic case's (diffusers returns ``torch.Tensor([0.0])``).

    Args:
        parameters (`torch.Tensor`): the moments, mean and log-variance concatenated on dim 1.
        deterministic (`bool`, *optional*, defaults to `False`): zero variance (``sample() == mode()``).
    """

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self ‖ other) summed over C, H, W → (B,); ``other=None`` means the prior N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        return super().kl(other)

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device, dtype=sample.dtype)
        return super().nll(sample, dims=list(dims))
