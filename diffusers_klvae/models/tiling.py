"""Tiled encode/decode. PLACEHOLDER until the tiling work lands: runs the untiled path (exact, not memory-bounded)."""

import torch


def tiled_encode(vae, x: torch.Tensor) -> torch.Tensor:
    moments = vae.encoder(x)
    return moments if vae.quant_conv is None else vae.quant_conv(moments)


def tiled_decode(vae, z: torch.Tensor) -> torch.Tensor:
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    return vae.decoder(z)
