"""Benchmark of `evaluate`: images/s of the full pass (PSNR, SSIM, LPIPS, rFID, real offline weights) and the share of
each stage, then the smoke run of issue 6 (random SD-config VAE vs a briefly trained tiny VAE).

    .venv/bin/python benchmarks/bench_eval.py                  # about 2.5 CPU-minutes; 5-6 min wall on 2 busy cores
    .venv/bin/python benchmarks/bench_eval.py --skip-smoke     # throughput only

Stages:
1. real weights: LPIPS (perceptual.load_lpips, auto) and the FID Inception (fid.load_fid_inception, auto) load;
   the offline Inception is checked against the TorchScript network it comes from (max |Δ feature| < 1e-4).
2. throughput: the small preset (random init) on the photos at 256², all four metrics: burn-in on 2 images, then
   the timed pass(es); images/s (median) and the share of time per stage. Reference in the same run: the
   reconstruction stage alone, so "metrics cost x times the model" does not depend on how busy the machine is.
3. smoke: the SD-config KLVAE (sd-kl-f8 preset, random weights) and an identity-like model, the `tiny` preset (f2)
   trained for 200 plain-MSE steps on crops of the same photos (the cheapest model that learns a real
   reconstruction in seconds on a CPU: the f8 `small` preset still outputs flat gray after 60 steps), evaluated on
   the photos with all four metrics; the trained model must win every metric.

Threads: on CPU the default is one intra-op thread. On shared, busy cores torch's thread pool spin-waits: a small-preset
training step measured 10x slower in wall time with 2 threads than with 1 on 2 busy cores. Pass --threads N on a
machine of your own.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusers_klvae import KLVAE  # noqa: E402
from diffusers_klvae.evaluation import DEFAULT_METRICS, compare, evaluate, results_table  # noqa: E402
from diffusers_klvae.fid import load_fid_inception  # noqa: E402
from diffusers_klvae.imaging import load_image, resize_and_crop, to_tensor, to_uint8  # noqa: E402
from diffusers_klvae.perceptual import load_lpips  # noqa: E402
from tools.seed_offline_weights import max_feature_difference  # noqa: E402

FID_TOLERANCE = 1e-4
STAGES = ("load", "reconstruct", "psnr", "ssim", "lpips", "rfid")


def photos_dir() -> Path:
    shared = ROOT.parent / "shared" / "data" / "photos"
    return shared if shared.is_dir() else ROOT / "assets" / "photos"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def check_weights(lpips_model, inception, photos: Path) -> bool:
    first = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".png"))[0]
    image = to_uint8(to_tensor(resize_and_crop(load_image(first), 256)))[None]
    start = time.perf_counter()
    diff = max_feature_difference(inception, image)
    print(f"LPIPS weights: {lpips_model.weights_source}")
    print(f"FID weights:   {inception.source}")
    print(f"offline Inception vs TorchScript network on {first.name}: max |Δ feature| = {diff:.2e} "
          f"({time.perf_counter() - start:.1f} s) -> {verdict(diff < FID_TOLERANCE)} (< {FID_TOLERANCE:g})")
    real = "random" not in lpips_model.weights_source.lower() and "random" not in inception.source.lower()
    print(f"real (not random) metric networks: {verdict(real)}")
    return diff < FID_TOLERANCE and real


def throughput(lpips_model, inception, photos: Path, *, resolution: int, batch_size: int, repeats: int) -> bool:
    torch.manual_seed(0)
    vae = KLVAE.from_preset("small").eval()
    kwargs = dict(resolution=resolution, batch_size=batch_size, lpips_model=lpips_model, fid_extractor=inception, progress=False)
    evaluate(vae, photos, max_images=2, **kwargs)  # burn-in: first calls allocate and pick kernels
    runs = []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = evaluate(vae, photos, **kwargs)
        runs.append((time.perf_counter() - start, result, time.process_time() - cpu_start))
    wall, result, cpu = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # median run
    total = sum(result.timings.values())
    print(f"\nthroughput: small preset, {result.count} photos at {resolution}², batch {batch_size}, all four metrics, "
          f"{repeats} timed run(s), median shown")
    print(f"  full evaluate pass: {wall:.1f} s -> {result.count / wall:.2f} images/s "
          f"(runs: {', '.join(f'{r[0]:.1f}' for r in runs)} s); process CPU time {cpu:.1f} s = {cpu / result.count:.2f} CPU-s/image "
          "(wall/CPU shows how busy the machine was)")
    for stage in STAGES:
        seconds = result.timings.get(stage, 0.0)
        print(f"  {stage:<12} {seconds:7.2f} s  {100 * seconds / total:5.1f} %")
    metrics_time = sum(result.timings.get(s, 0.0) for s in ("psnr", "ssim", "lpips", "rfid"))
    ratio = metrics_time / result.timings["reconstruct"]
    print(f"  metrics / reconstruction (same run): {ratio:.2f}x")
    print(f"throughput measured: {result.count / wall:.2f} images/s -> REPORTED (no target set in the issue)")
    return True


def train_identity_like(photos: Path, *, steps: int, crop: int, resolution: int, seed: int = 0) -> KLVAE:
    """The tiny preset trained with plain MSE on random crops of the photos: a crude but real autoencoder."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = [resize_and_crop(load_image(p), resolution) for p in sorted(photos.iterdir()) if p.suffix.lower() in (".jpg", ".png")]
    vae = KLVAE.from_preset("tiny").train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(steps):
        picks = torch.randint(0, len(images), (4,), generator=generator).tolist()
        x = torch.stack([to_tensor(resize_and_crop(images[i], crop, center_crop=False, generator=generator)) for i in picks])
        loss = (vae(x).sample - x).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(f"  trained tiny preset: {steps} Adam steps, batch 4, {crop}² crops, last MSE {loss.item():.4f}")
    return vae.eval()


def smoke(lpips_model, inception, photos: Path, *, resolution: int, steps: int) -> bool:
    print(f"\nsmoke run: SD-config KLVAE (random weights) vs tiny preset trained {steps} MSE steps, photos at {resolution}²")
    start = time.perf_counter()
    trained = train_identity_like(photos, steps=steps, crop=max(resolution // 2, 32), resolution=resolution)
    train_s = time.perf_counter() - start
    torch.manual_seed(0)
    models = [KLVAE.from_preset("sd-kl-f8").eval(), trained]
    start = time.perf_counter()
    results, _ = compare(models, photos, grid_images=0, lpips_model=lpips_model, fid_extractor=inception,
                         resolution=resolution, batch_size=4, progress=False)
    results[0].model, results[1].model = "sd-kl-f8 (random weights)", f"tiny (f2), {steps} MSE steps"
    print(results_table(results))
    print(f"  training {train_s:.1f} s, evaluation of both {time.perf_counter() - start:.1f} s")
    random_sd, trained_metrics = (r.metrics for r in results)
    wins = {m: (trained_metrics[m].mean > random_sd[m].mean) if m in ("psnr", "ssim") else (trained_metrics[m].mean < random_sd[m].mean)
            for m in DEFAULT_METRICS}
    print(f"trained tiny beats random SD-config on {', '.join(m for m, ok in wins.items() if ok) or 'nothing'} "
          f"-> {verdict(all(wins.values()))}")
    return all(wins.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="timed evaluate passes (median reported)")
    parser.add_argument("--smoke-resolution", type=int, default=64, help="smoke run resolution (the SD-config model is slow on CPU)")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (see the module docstring)")
    parser.add_argument("--skip-smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    photos = photos_dir()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"photos: {photos}; device: {device}; torch threads: {torch.get_num_threads()}")
    start = time.perf_counter()
    lpips_model = load_lpips("vgg", device=device)
    inception = load_fid_inception(device=device)
    print(f"metric networks loaded in {time.perf_counter() - start:.1f} s")
    ok = check_weights(lpips_model, inception, photos)
    ok &= throughput(lpips_model, inception, photos, resolution=args.resolution, batch_size=args.batch_size, repeats=args.repeats)
    if not args.skip_smoke:
        ok &= smoke(lpips_model, inception, photos, resolution=args.smoke_resolution, steps=args.train_steps)
    print(f"\noverall: {verdict(ok)}  (total {time.perf_counter() - start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
