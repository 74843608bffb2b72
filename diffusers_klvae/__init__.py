"""diffusers-klvae: train, evaluate and publish KL-regularized image autoencoders for diffusers."""

from .models import PRESETS, DiagonalGaussianDistribution, KLVAE, KLVAEOutput, list_presets, preset_config

__version__ = "0.1.0"
__all__ = ["KLVAE", "KLVAEOutput", "DiagonalGaussianDistribution", "PRESETS", "list_presets", "preset_config"]
