"""Latent tools speed: the linear RGB preview vs a full decode, and pixel -> latent mask mapping.

    python benchmarks/bench_latents.py [--preset small] [--resolution 256] [--runs 5]

Burn-in, then the median of timed runs; ratios are measured in the same run (CPU timings on shared machines
are noisy, ratios less so). Targets (issue 9): the preview is >= 100x faster than decoding (it is what UIs
show at every sampling step); mapping a batch of eight 1024² masks takes < 50 ms of CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, *, runs: int, sync) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of ``runs`` calls after one burn-in call.

    CPU time is what a loaded shared machine cannot inflate (it sums threads: run with OMP_NUM_THREADS=1 to
    read it as compute time); wall time is what a user waits.
    """
    fn()
    sync()
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    from diffusers_klvae import KLVAE
    from diffusers_klvae.latent_masks import mask_to_latent, random_pixel_mask
    from diffusers_klvae.latent_preview import fit_latent_rgb_map, latents_to_rgb

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)

    vae = KLVAE.from_preset(args.preset).to(device).eval()
    f = vae.downsampling_factor
    z = torch.randn(args.batch_size, vae.config.latent_channels, args.resolution // f, args.resolution // f, device=device)
    factors = fit_latent_rgb_map(torch.randn(2, vae.config.latent_channels, 8, 8), torch.rand(2, 3, 8 * f, 8 * f) * 2 - 1)
    with torch.no_grad():
        t_decode = timed(lambda: vae.decode(z).sample, runs=args.runs, sync=sync)
        t_preview = timed(lambda: latents_to_rgb(z, factors), runs=args.runs * 20, sync=sync)
    masks = random_pixel_mask(8, 1024, 1024, "strokes", torch.Generator().manual_seed(0), grid=f).to(device)
    t_mask = {mode: timed(lambda: mask_to_latent(masks, f, mode), runs=args.runs * 4, sync=sync) for mode in ("any", "all", "area")}

    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} preset={args.preset} "
          f"latents={tuple(z.shape)} (image {args.resolution}²) runs={args.runs}")
    print(f"{'':22s}{'wall ms':>10s}{'cpu ms':>10s}")
    print(f"{'decode':22s}{t_decode[0] * 1e3:10.2f}{t_decode[1] * 1e3:10.2f}")
    print(f"{'latents_to_rgb':22s}{t_preview[0] * 1e3:10.3f}{t_preview[1] * 1e3:10.3f}")
    for mode, t in t_mask.items():
        print(f"{'mask_to_latent ' + mode:22s}{t[0] * 1e3:10.2f}{t[1] * 1e3:10.2f}  (8 x 1024² masks)")
    ratio = t_decode[0] / t_preview[0]
    print(f"verdict: preview {ratio:.0f}x faster than decode, wall (target >= 100x): {'PASS' if ratio >= 100 else 'FAIL'}")
    worst = max(t[1] for t in t_mask.values())
    print(f"verdict: mask_to_latent worst mode {worst * 1e3:.1f} ms CPU for 8 x 1024² (target < 50 ms): {'PASS' if worst < 0.05 else 'FAIL'}")


if __name__ == "__main__":
    main()
