"""Tiled vs untiled encode/decode: fidelity, time and peak working memory, KLVAE vs diffusers' AutoencoderKL.

Same weights (SD KL-f8 config, random init perturbed so that every layer matters: GroupNorm gains/biases and all
biases randomized) and the same latents (the real photos encoded by that model) for both classes, in one run.

Memory: every time/memory figure comes from a fresh subprocess that loads the model and inputs, resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``), runs the call once and reads ``VmHWM - VmRSS(before)``:
the working memory above the loaded model. Time: the same call, after a 256² burn-in in that process.

    python benchmarks/bench_tiling.py                 # full run (~45 min on 2 cores)
    python benchmarks/bench_tiling.py --quick         # fidelity and timings at 512² only (tile 256)
    python benchmarks/bench_tiling.py --skip-2048     # everything but the 2048² run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = [ROOT.parent / "shared" / "data" / "photos", ROOT / "assets" / "photos"]
SD_TILE = 512  # diffusers' default tile for the SD config (sample_size)


def build(cls_name: str, weights: str | None = None):
    from diffusers import AutoencoderKL

    from diffusers_klvae import KLVAE

    cls = KLVAE if cls_name == "klvae" else AutoencoderKL
    vae = cls(**KLVAE.preset_config("sd-kl-f8")).eval()
    if weights:
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(weights))
    return vae


def perturbed_state(seed: int = 0, state: dict | None = None) -> dict:
    """Weights where every layer matters: random GroupNorm affine and biases (default init has 1/0), from ``state``
    (default: a fresh SD-config model's)."""
    g = torch.Generator().manual_seed(seed)
    state, perturbed = state or build("klvae").state_dict(), {}
    for name, p in state.items():
        if "norm" in name and name.endswith("weight"):
            p = 1 + 0.25 * torch.randn(p.shape, generator=g)
        elif name.endswith("bias"):
            p = 0.05 * torch.randn(p.shape, generator=g)
        perturbed[name] = p.contiguous()
    return perturbed


def photo(name: str, size: tuple[int, int]) -> torch.Tensor:
    from diffusers_klvae.imaging import load_image, resize_and_crop, to_tensor

    for folder in PHOTOS:
        path = folder / name
        if path.exists():
            break
    else:
        path = next(p for p in sorted(PHOTOS[-1].glob("*.jpg")))
    img = load_image(path)
    h, w = size
    if h == w:
        img = resize_and_crop(img, h)
    else:
        img = img.resize((w, h))
    return to_tensor(img)[None]


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of x against ref with the peak = ref's value range (the issue's 'range-normalized')."""
    rng = (ref.max() - ref.min()).item()
    return 10 * torch.log10(rng**2 / (x - ref).double().square().mean()).item()


def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def worker(spec: dict) -> dict:
    """In a fresh process: one call, its wall time and peak working memory above the loaded model and inputs."""
    torch.manual_seed(0)
    vae = build(spec["cls"], spec["weights"])
    tile = spec.get("tile")
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 32, 32))  # burn-in (256²)
        if tile:
            vae.enable_tiling()
            vae.tile_stat_passes = spec.get("stat_passes")
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
        z = torch.randn(1, 4, spec["size"] // 8, spec["size"] // 8, generator=torch.Generator().manual_seed(1))
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        out = vae.decode(z).sample
        seconds = time.perf_counter() - start
        peak = _status("VmHWM")
    return {"seconds": seconds, "memory_gb": (peak - before) / 2**30, "shape": list(out.shape)}


def measure(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def fidelity(models: dict, sizes: list[tuple[int, int]]) -> list[str]:
    verdicts = []
    for h, w in sizes:
        name = "retina.jpg" if h == w else "hubble_deep_field.jpg"
        x = photo(name, (h, w))
        for label, vae in models.items():
            with torch.no_grad():
                vae.disable_tiling()
                moments_ref = vae.encode(x).latent_dist.mean
                z = moments_ref
                ref = vae.decode(z).sample
                tile = min(SD_TILE, max(h, w) // 2)  # at 512² the SD tile would cover the image: use 256
                vae.enable_tiling()
                vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
                t0 = time.perf_counter()
                tiled = vae.decode(z).sample
                dt = time.perf_counter() - t0
                moments = vae.encode(x).latent_dist.mean
                vae.disable_tiling()
            if tiled.shape != ref.shape:  # diffusers' tiled decode can return a larger image when tiles do not divide it
                print(f"{label:14s} {h}x{w}: tiled decode returned {tuple(tiled.shape[2:])}, cropped to {(h, w)} to compare")
                tiled = tiled[:, :, :h, :w]
            dec, enc = psnr(tiled, ref), psnr(moments, moments_ref)
            print(f"{label:14s} {h}x{w} ({name}): tiled vs untiled decode PSNR {dec:6.2f} dB "
                  f"(max abs {(tiled - ref).abs().max():.3g}), encode PSNR {enc:6.2f} dB  [tile {tile}, tiled decode {dt:.1f} s]", flush=True)
            if label == "KLVAE" and h == w == 1024:  # 4×4 tiles: beyond the whole-map budget, statistics passes run
                small_tile(vae, x, z, ref, moments_ref, tile=tile // 2)
            if label == "KLVAE":
                verdicts.append(f"{'PASS' if dec >= 45 else 'MISS'} tiled decode >= 45 dB at {h}x{w}: {dec:.2f} dB")
                verdicts.append(f"{'PASS' if enc >= 45 else 'MISS'} tiled encode >= 45 dB at {h}x{w}: {enc:.2f} dB")
    return verdicts


def small_tile(vae, x: torch.Tensor, z: torch.Tensor, ref: torch.Tensor, moments_ref: torch.Tensor, *, tile: int) -> None:
    """Fidelity where the image is too large for the whole-map budget (the tiled part uses statistics passes)."""
    with torch.no_grad():
        vae.enable_tiling(tile_sample_min_size=tile)
        t0 = time.perf_counter()
        tiled = vae.decode(z).sample
        dt = time.perf_counter() - t0
        moments = vae.encode(x).latent_dist.mean
        vae.disable_tiling()
    print(f"{'KLVAE':14s} {x.shape[2]}x{x.shape[3]} with tile {tile} (statistics passes: {vae.tile_stat_passes or 1}): "
          f"decode PSNR {psnr(tiled, ref):6.2f} dB, encode PSNR {psnr(moments, moments_ref):6.2f} dB  [tiled decode {dt:.1f} s]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fidelity and timings at 512² only")
    parser.add_argument("--skip-2048", action="store_true", help="skip the 2048² tiled decode")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--fidelity-sizes", nargs="+", default=None, metavar="HxW",
                        help="fidelity sizes (default: 512x512 1024x1024 776x1000; 512x512 with --quick)")
    parser.add_argument("--stat-passes", type=int, default=None, help="KLVAE statistics passes (default: tiling.STAT_PASSES)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    weights = os.path.join(tmp, "weights.safetensors")
    from safetensors.torch import save_file

    save_file(perturbed_state(), weights)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SD KL-f8 config, perturbed random weights, fp32 CPU", flush=True)
    verdicts = []
    if not args.skip_fidelity:
        models = {"KLVAE": build("klvae", weights), "AutoencoderKL": build("diffusers", weights)}
        models["KLVAE"].tile_stat_passes = args.stat_passes
        sizes = [(512, 512)] if args.quick else [(512, 512), (1024, 1024), (776, 1000)]
        if args.fidelity_sizes:
            sizes = [tuple(int(v) for v in size.split("x")) for size in args.fidelity_sizes]
        verdicts += fidelity(models, sizes)
        del models
    size = 512 if args.quick else 1024
    runs = {}
    for label, cls, tile in (("KLVAE untiled", "klvae", None), ("AutoencoderKL untiled", "diffusers", None),
                             ("KLVAE tiled", "klvae", size // 2), ("AutoencoderKL tiled", "diffusers", size // 2)):
        runs[label] = measure({"cls": cls, "weights": weights, "size": size, "tile": tile, "stat_passes": args.stat_passes})
        print(f"{label:22s} {size}² decode: {runs[label]['seconds']:7.1f} s, working memory {runs[label]['memory_gb']:.2f} GB", flush=True)
    for mode in ("untiled", "tiled"):
        k, d = runs[f"KLVAE {mode}"], runs[f"AutoencoderKL {mode}"]
        print(f"ratio KLVAE/AutoencoderKL {mode}: time {k['seconds'] / d['seconds']:.2f}x, memory {k['memory_gb'] / d['memory_gb']:.2f}x")
    k, d = runs["KLVAE tiled"], runs["AutoencoderKL tiled"]
    verdicts.append(f"{'PASS' if k['seconds'] <= d['seconds'] else 'MISS'} tiled {size}² time <= AutoencoderKL tiled: {k['seconds'] / d['seconds']:.2f}x")
    verdicts.append(f"{'PASS' if k['memory_gb'] <= 2 * d['memory_gb'] else 'MISS'} tiled {size}² memory <= 2x AutoencoderKL tiled: {k['memory_gb'] / d['memory_gb']:.2f}x")
    k, d = runs["KLVAE untiled"], runs["AutoencoderKL untiled"]
    verdicts.append(f"{'PASS' if k['memory_gb'] <= 0.6 * d['memory_gb'] else 'MISS'} untiled {size}² memory <= 0.6x AutoencoderKL: {k['memory_gb'] / d['memory_gb']:.2f}x")
    verdicts.append(f"{'PASS' if k['seconds'] <= d['seconds'] else 'MISS'} untiled {size}² time <= 1.0x AutoencoderKL: {k['seconds'] / d['seconds']:.2f}x")
    if not (args.quick or args.skip_2048):
        big = measure({"cls": "klvae", "weights": weights, "size": 2048, "tile": SD_TILE, "stat_passes": args.stat_passes})
        print(f"KLVAE tiled 2048² decode: {big['seconds']:.1f} s, working memory {big['memory_gb']:.2f} GB", flush=True)
        verdicts.append(f"{'PASS' if big['memory_gb'] <= 2 else 'MISS'} tiled 2048² decode completes with <= 2 GB: {big['memory_gb']:.2f} GB")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
