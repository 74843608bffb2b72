"""Tiled vs untiled encode/decode: fidelity, time and peak working memory, KLVAE vs diffusers' AutoencoderKL.

Same weights (SD KL-f8 config, random init perturbed so that every layer matters: GroupNorm gains/biases and all
biases randomized) for both classes, in one run; the untiled KLVAE result is the reference of both (the two classes
agree untiled to ~1e-5).

Fidelity: real photos at sizes that are not multiples of the tile, from 2×3 to 8×8 tiles; encode (moments) and decode
(of the untiled moments), KLVAE with its maps stored in centred, scaled float16 (the default), bfloat16 and float32,
diffusers tiled.
Memory and time: a fresh subprocess per figure loads the model, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), runs one tiled decode (after a 64² burn-in) and reads ``VmHWM - VmRSS(before)``: the
working memory above the loaded model. Time: wall clock, and the process's CPU time (user + system), which is the fair
figure when other processes share the cores.

    python benchmarks/bench_tiling.py                  # everything (~40 min on 2 cores)
    python benchmarks/bench_tiling.py --skip-big       # fidelity only (~10 min)
    python benchmarks/bench_tiling.py --skip-fidelity  # the 2048² decodes only (~30 min)
    python benchmarks/bench_tiling.py --quick          # logic self-test at small sizes (~1 min)
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
PHOTOS = [ROOT.parent / "shared" / "data" / "photos", *sorted(p for p in (ROOT / "assets").iterdir() if p.is_dir())]
# (photo, height, width, tile): 2×3, 3×4 and 8×8 tiles, no size a multiple of its tile
CASES = [("china.jpg", 392, 520, 256), ("hubble_deep_field.jpg", 520, 776, 256), ("retina.jpg", 504, 504, 64)]
QUICK_CASES = [("astronaut.jpg", 136, 200, 64)]
FIDELITY_DB, EXACT_ABS = 55.0, 1e-4  # the targets: 2-byte maps, float32 maps


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

    path = next((folder / name for folder in PHOTOS if (folder / name).is_file()), None)
    if path is None:  # a silently swapped photo would mislabel every row
        raise SystemExit(f"bench_tiling.py: error: photo {name!r} not found in {', '.join(map(str, PHOTOS))}")
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


def tile_counts(h: int, w: int, tile: int) -> str:
    return f"{-(-h // tile)}x{-(-w // tile)}"


def set_tiling(vae, tile: int, **options) -> None:
    """Tiling with ``tile``-pixel tiles; KLVAE options (storage_dtype, map_store) only for KLVAE."""
    vae.enable_tiling()  # diffusers' enable_tiling() takes no size: set the attributes by hand for both
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
    if options:
        vae.enable_tiling(**options)


def fidelity(klvae, akl, cases) -> list[str]:
    verdicts = []
    for name, h, w, tile in cases:
        x = photo(name, (h, w))
        tiles = tile_counts(h, w, tile)
        with torch.no_grad():
            klvae.disable_tiling()
            t0 = time.perf_counter()
            moments = klvae.encode(x).latent_dist.mean
            ref = klvae.decode(moments).sample
            untiled_s = time.perf_counter() - t0
            rows = {}
            for label, vae, options in (("KLVAE fp16 maps", klvae, {"storage_dtype": torch.float16}),
                                        ("KLVAE bf16 maps", klvae, {"storage_dtype": torch.bfloat16}),
                                        ("KLVAE fp32 maps", klvae, {"storage_dtype": torch.float32}),
                                        ("AutoencoderKL", akl, {})):
                set_tiling(vae, tile, **options)
                t0 = time.perf_counter()
                enc = vae.encode(x).latent_dist.mean
                dec = vae.decode(moments).sample[:, :, :h, :w]  # diffusers' can return a larger image
                seconds = time.perf_counter() - t0
                vae.disable_tiling()
                rows[label] = (psnr(enc, moments), (enc - moments).abs().max().item(), psnr(dec, ref),
                               (dec - ref).abs().max().item())
                print(f"{h}x{w} {name} tile {tile} ({tiles} tiles) {label:16s}: encode {rows[label][0]:6.2f} dB "
                      f"(max abs {rows[label][1]:.2g}), decode {rows[label][2]:6.2f} dB (max abs {rows[label][3]:.2g})  "
                      f"[tiled {seconds:.1f} s, untiled {untiled_s:.1f} s]", flush=True)
        klvae.tile_storage_dtype = None
        _, enc_abs, _, dec_abs = rows["KLVAE fp32 maps"]
        where = f"{h}x{w}, {tiles} tiles of {tile}"
        for storage in ("fp16", "bf16"):
            enc_db, _, dec_db, _ = rows[f"KLVAE {storage} maps"]
            verdicts += [f"{'PASS' if enc_db >= FIDELITY_DB else 'MISS'} tiled encode >= {FIDELITY_DB:g} dB ({storage} "
                         f"maps), {where}: {enc_db:.2f} dB",
                         f"{'PASS' if dec_db >= FIDELITY_DB else 'MISS'} tiled decode >= {FIDELITY_DB:g} dB ({storage} "
                         f"maps), {where}: {dec_db:.2f} dB"]
        verdicts += [f"{'PASS' if enc_abs <= EXACT_ABS else 'MISS'} tiled encode max abs <= {EXACT_ABS:g} (fp32 maps), "
                     f"{where}: {enc_abs:.2g}",
                     f"{'PASS' if dec_abs <= EXACT_ABS else 'MISS'} tiled decode max abs <= {EXACT_ABS:g} (fp32 maps), "
                     f"{where}: {dec_abs:.2g}"]
    return verdicts


def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def worker(spec: dict) -> dict:
    """In a fresh process: one tiled decode, its wall time and peak working memory above the loaded model and inputs."""
    torch.manual_seed(0)
    vae = build(spec["cls"], spec["weights"])
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 8, 8))  # burn-in (64²: loads the kernels, leaves little in the heap)
        set_tiling(vae, spec["tile"], **({"map_store": spec["store"]} if spec["cls"] == "klvae" else {}))
        z = torch.randn(1, 4, spec["size"] // 8, spec["size"] // 8, generator=torch.Generator().manual_seed(1))
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start, cpu_start = time.perf_counter(), time.process_time()
        out = vae.decode(z).sample
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        peak = _status("VmHWM")
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "memory_gb": (peak - before) / 2**30,
            "shape": list(out.shape)}


def measure(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def big_decode(weights: str, size: int, tile: int, runs: list[str]) -> list[str]:
    """Tiled decodes at ``size``² with ``tile``-pixel tiles: KLVAE with the map store in memory and in a file,
    diffusers' tiled decode; time and working memory of each."""
    got = {}
    for run in runs:
        cls, store = ("diffusers", None) if run == "AutoencoderKL" else ("klvae", run.split()[-1])
        got[run] = measure({"cls": cls, "weights": weights, "size": size, "tile": tile, "store": store})
        print(f"{run:18s} tiled {size}² decode (tile {tile}): {got[run]['seconds']:7.1f} s ({got[run]['cpu_seconds']:.1f} s "
              f"of CPU), working memory {got[run]['memory_gb']:.2f} GB", flush=True)
    verdicts = []
    if "KLVAE memory" in got:
        verdicts.append(f"{'PASS' if got['KLVAE memory']['memory_gb'] <= 2 else 'MISS'} tiled {size}² decode (tile "
                        f"{tile}) working memory <= 2 GB: {got['KLVAE memory']['memory_gb']:.2f} GB")
    if "KLVAE file" in got:
        verdicts.append(f"{'PASS' if got['KLVAE file']['memory_gb'] <= 1 else 'MISS'} tiled {size}² decode (tile "
                        f"{tile}), maps in a file, working memory <= 1 GB: {got['KLVAE file']['memory_gb']:.2f} GB")
    for run in ("KLVAE memory", "KLVAE file"):
        if run in got and "AutoencoderKL" in got:
            ratio = got[run]["seconds"] / got["AutoencoderKL"]["seconds"]
            cpu = got[run]["cpu_seconds"] / got["AutoencoderKL"]["cpu_seconds"]
            verdicts.append(f"{'PASS' if ratio <= 1 else 'MISS'} tiled {size}² decode time ({run}) <= AutoencoderKL "
                            f"tiled: {ratio:.2f}x (CPU time: {cpu:.2f}x)")
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small sizes: a self-test of the script")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--skip-big", action="store_true", help="skip the large tiled decodes")
    parser.add_argument("--cases", nargs="+", default=None, metavar="PHOTO:HxW@TILE",
                        help="fidelity cases, e.g. retina.jpg:248x248@32 (default: 2x3, 3x4 and 8x8 tiles at ~0.2-0.4 MP)")
    parser.add_argument("--big-size", type=int, default=2048, help="size of the timed tiled decodes (default 2048)")
    parser.add_argument("--big-tile", type=int, default=256, help="their tile size (default 256)")
    parser.add_argument("--big-runs", nargs="+", default=["KLVAE memory", "KLVAE file", "AutoencoderKL"],
                        help="which large decodes: 'KLVAE memory', 'KLVAE file', 'AutoencoderKL'")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="bench_tiling-")  # 330 MB of weights, removed when main returns
    weights = os.path.join(tmp.name, "weights.safetensors")
    from safetensors.torch import save_file

    save_file(perturbed_state(), weights)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SD KL-f8 config, perturbed random weights, "
          f"fp32 CPU", flush=True)
    verdicts = []
    if not args.skip_fidelity:
        cases = QUICK_CASES if args.quick else CASES
        if args.cases:
            parsed = [re.fullmatch(r"(.+):(\d+)x(\d+)@(\d+)", case) for case in args.cases]
            if not all(parsed):
                parser.error(f"--cases expects PHOTO:HxW@TILE, e.g. retina.jpg:248x248@32; got {args.cases}")
            cases = [(m[1], int(m[2]), int(m[3]), int(m[4])) for m in parsed]
        verdicts += fidelity(build("klvae", weights), build("diffusers", weights), cases)
    if not args.skip_big:
        size, tile = (256, 64) if args.quick else (args.big_size, args.big_tile)
        verdicts += big_decode(weights, size, tile, args.big_runs)
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
