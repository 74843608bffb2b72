"""The diagonal Gaussian posterior q(z|x) of a KL autoencoder, with diffusers' ``DiagonalGaussianDistribution`` interface."""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # clamp as LDM does: exp() stays finite in fp16 and fp32


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element, built from the encoder's moments (B, 2C, h, w) = [mean | logvar].

    Args:
        parameters (`torch.Tensor`): the moments, mean and log-variance concatenated on dim 1.
        deterministic (`bool`, *optional*, defaults to `False`): zero variance (``sample() == mode()``).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std · ε with ε ~ N(0, I) drawn from ``generator`` (on the parameters' device and dtype)."""
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.parameters.device, dtype=self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self ‖ other) summed over C, H, W → (B,); ``other=None`` means the prior N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device, dtype=sample.dtype)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))
