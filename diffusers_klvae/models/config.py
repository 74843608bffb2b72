"""What a KLVAE config may hold, and how it is written to disk.

A default-architecture KLVAE saves as a plain ``AutoencoderKL`` folder (tools that know only diffusers read it); a
model with KLVAE-only extras keeps them, and one with squeeze-and-excitation renames its down blocks so that plain
``AutoencoderKL`` refuses the folder instead of silently dropping the gates.
"""

from __future__ import annotations

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
# On disk, an SE model's down blocks carry this name, so that plain AutoencoderKL refuses the folder loudly
# ("... does not exist") instead of silently dropping the gates.
SE_DOWN_BLOCK_TYPE = "SqueezeExcitationDownEncoderBlock2D(needs diffusers_klvae.KLVAE)"
# KLVAE-only config keys and their defaults: at these values a saved folder is a plain AutoencoderKL folder.
EXTRA_CONFIG_DEFAULTS = {"encoder_squeeze_excitation": False, "latent_rgb_factors": None}


def downsampling_factor_of(config) -> int:
    """The spatial factor between images and latents: one 2x downsample between consecutive encoder levels."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def validate_architecture(in_channels, out_channels, down_block_types, up_block_types, block_out_channels,
                          layers_per_block, latent_channels, norm_num_groups) -> None:
    """Raise a ValueError naming the wrong value and what is allowed (``act_fn`` is checked by ``blocks.activation``)."""
    levels = len(block_out_channels)
    if levels == 0:
        raise ValueError("block_out_channels must list at least one level, e.g. (128, 256, 512, 512)")
    for name, types, allowed in (("down_block_types", down_block_types, DOWN_BLOCK_TYPES), ("up_block_types", up_block_types, UP_BLOCK_TYPES)):
        bad = [t for t in types if t not in allowed]
        if bad:
            raise ValueError(f"{name} has unknown block type {bad[0]!r}; allowed: {list(allowed)}")
        if len(types) != levels:
            raise ValueError(f"{name} has {len(types)} entries but block_out_channels has {levels}: give one per level")
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("latent_channels", latent_channels),
                        ("layers_per_block", layers_per_block), ("norm_num_groups", norm_num_groups)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    for channels in block_out_channels:
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"block_out_channels entries must be positive integers; got {channels!r}")
        if channels % norm_num_groups:
            raise ValueError(f"block_out_channels entry {channels} is not divisible by norm_num_groups={norm_num_groups}; "
                             f"use channel counts that are multiples of {norm_num_groups} or a divisor of {channels} as norm_num_groups")


def config_for_disk(config: dict) -> dict:
    """The config as ``config.json`` holds it: a plain AutoencoderKL config at the extras' defaults, else KLVAE's with
    SE down blocks marked."""
    if all(config.get(key) == default for key, default in EXTRA_CONFIG_DEFAULTS.items()):
        config = {k: v for k, v in config.items() if k not in EXTRA_CONFIG_DEFAULTS}
        config["_class_name"] = "AutoencoderKL"
    elif config.get("encoder_squeeze_excitation"):
        config = {**config, "down_block_types": [SE_DOWN_BLOCK_TYPE] * len(config["down_block_types"])}
    return config


def config_from_disk(config: dict) -> dict:
    """``config_for_disk`` undone: marked SE down blocks become ``encoder_squeeze_excitation=True``."""
    config = dict(config)
    if SE_DOWN_BLOCK_TYPE in (config.get("down_block_types") or ()):
        config["down_block_types"] = [DOWN_BLOCK_TYPES[0]] * len(config["down_block_types"])
        config["encoder_squeeze_excitation"] = True
    return config
