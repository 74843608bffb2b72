"""Markdown table of the KLVAE presets: parameters, GFLOPs of encode + decode at 256², latent shape at 256².

    python benchmarks/model_table.py [--resolution 256]

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls and attention; norms and
activations are not counted, as usual) on the meta device: no weights are allocated and nothing is computed, so the
table costs a second even for the 84M-parameter presets. GFLOPs = 1e9 floating-point operations (a multiply-add = 2).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusers_klvae import KLVAE, list_presets


def measure(name: str, resolution: int) -> dict:
    """Parameters, encode/decode GFLOPs and latent shape of one preset at ``resolution``² (batch 1)."""
    with torch.device("meta"):
        vae = KLVAE.from_preset(name).eval()
        x = torch.empty(1, vae.config.in_channels, resolution, resolution)
    params = sum(p.numel() for p in vae.parameters())
    with torch.no_grad():
        with FlopCounterMode(display=False) as enc_counter:
            z = vae.encode(x).latent_dist.mode()
        with FlopCounterMode(display=False) as dec_counter:
            vae.decode(z)
    return dict(name=name, params=params, encode=enc_counter.get_total_flops() / 1e9,
                decode=dec_counter.get_total_flops() / 1e9, latent=tuple(z.shape[1:]), factor=vae.downsampling_factor)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256, help="square input side in pixels (default 256)")
    args = parser.parse_args(argv)
    r = args.resolution
    rows = [measure(name, r) for name in list_presets()]
    print(f"| preset | params (M) | factor | latent at {r}² (C×h×w) | encode GFLOPs | decode GFLOPs | encode+decode GFLOPs at {r}² |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for row in rows:
        latent = "×".join(str(s) for s in row["latent"])
        print(f"| `{row['name']}` | {row['params'] / 1e6:.2f} | f{row['factor']} | {latent} | {row['encode']:.1f} | "
              f"{row['decode']:.1f} | {row['encode'] + row['decode']:.1f} |")
    # cross-check: diffusers' AutoencoderKL with the SD config counts the same parameters and FLOPs
    sd = next(row for row in rows if row["name"] == "sd-kl-f8")
    ref = measure_reference(r)
    same = ref["params"] == sd["params"] and abs(ref["flops"] - sd["encode"] - sd["decode"]) < 1e-6 * ref["flops"]
    print(f"\ncheck vs diffusers AutoencoderKL (sd-kl-f8 config): params {ref['params'] / 1e6:.2f} M, "
          f"{ref['flops']:.1f} GFLOPs -> {'MATCH' if same else 'MISMATCH'}")


def measure_reference(resolution: int) -> dict:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**KLVAE.preset_config("sd-kl-f8")).eval()
        x = torch.empty(1, 3, resolution, resolution)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.decode(vae.encode(x).latent_dist.mode())
    return dict(params=sum(p.numel() for p in vae.parameters()), flops=counter.get_total_flops() / 1e9)


if __name__ == "__main__":
    main()
