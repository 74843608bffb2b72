"""Named configurations, each one plain ``KLVAE(**config)`` keyword arguments.

``sd-kl-f8`` is Stable Diffusion 1.x/2.x's VAE (``stabilityai/sd-vae-ft-mse``); ``sdxl`` the same architecture with
SDXL's latent scale; ``kl-f8-16ch`` a 16-channel f8 latent without quant convs (the SD3/FLUX layout; its
scaling/shift are starting values: measure your own with ``klvae-stats``); ``small`` a KL-f8 for little compute;
``tiny`` a two-level (f2) toy for tests and debugging.
"""

from __future__ import annotations

import copy

_SD = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)

PRESETS: dict[str, dict] = {
    "sd-kl-f8": {**_SD, "sample_size": 512, "scaling_factor": 0.18215},
    "sdxl": {**_SD, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    "kl-f8-16ch": {**_SD, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
                   "use_quant_conv": False, "use_post_quant_conv": False},
    "small": {**_SD, "block_out_channels": (32, 64, 128, 128), "layers_per_block": 1, "sample_size": 256,
              "norm_num_groups": 32},
    "tiny": dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32),
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def preset_config(name: str) -> dict:
    """Preset name → a fresh copy of its ``KLVAE`` keyword arguments."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(list_presets())}")
    return copy.deepcopy(PRESETS[name])
