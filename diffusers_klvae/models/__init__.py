from .autoencoder_kl import KLVAE, KLVAEOutput
from .posterior import DiagonalGaussianDistribution
from .presets import PRESETS, list_presets, preset_config

__all__ = ["KLVAE", "KLVAEOutput", "DiagonalGaussianDistribution", "PRESETS", "list_presets", "preset_config"]
