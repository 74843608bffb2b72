"""Training throughput of train_autoencoder.py's step: images/s before and after disc_start, and peak memory.

    python benchmarks/bench_train.py [--resolution 256] [--batch_size 2] [--steps 3] [--warmup 1] [--device cpu]

What is timed is ``diffusers_klvae.training.train_step`` under a real ``Accelerator`` (the function the script
calls): one forward of the prepared VAE, the generator loss (L2 + real LPIPS VGG + KL, plus the adaptive GAN term
after ``disc_start``), backward, clip, AdamW step, and after ``disc_start`` the discriminator step. Small preset,
batch 2 at 256² by default. Burn-in steps first, then the median over timed steps (``cuda.synchronize`` around
the timer on GPU). Peak memory: process peak RSS (``resource.getrusage``) on CPU, ``max_memory_allocated`` on GPU.
Both phases run in this process, so their ratio is measured under the same load.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers_klvae import KLVAE, training  # noqa: E402
from diffusers_klvae.discriminator import NLayerDiscriminator  # noqa: E402
from diffusers_klvae.losses import KLVAELoss  # noqa: E402
from diffusers_klvae.perceptual import load_lpips  # noqa: E402

DISC_START = 1000  # "before" steps run below it, "after" steps above it


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def time_phase(accelerator, vae, disc, loss_fn, optimizers, x, *, first_step: int, warmup: int, steps: int, generator) -> list[float]:
    times = []
    for i in range(warmup + steps):
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        training.train_step(accelerator, vae, disc, loss_fn, optimizers, x, first_step + i, generator=generator)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--preset", default="small")
    p.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    args = p.parse_args(argv)

    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    vae, disc = KLVAE.from_preset(args.preset), NLayerDiscriminator()
    lpips = load_lpips("vgg")
    loss_fn = KLVAELoss(discriminator=disc, perceptual=lpips, disc_start=DISC_START)
    optimizers = training.build_optimizers(vae, disc, learning_rate=1e-5, disc_learning_rate=1e-5)
    vae, disc, *optimizers = accelerator.prepare(vae, disc, *optimizers)
    loss_fn.discriminator = disc
    loss_fn.to(accelerator.device)
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=accelerator.device) * 2 - 1
    generator = torch.Generator().manual_seed(0)

    print(f"device {accelerator.device} ({torch.get_num_threads()} CPU threads), preset {args.preset}, "
          f"{args.resolution}², batch {args.batch_size}, mixed precision {args.mixed_precision}, LPIPS: {lpips.weights_source}")
    results = {}
    for name, first in [("before disc_start", 0), ("after disc_start", DISC_START)]:
        times = time_phase(accelerator, vae, disc, loss_fn, optimizers, x, first_step=first, warmup=args.warmup,
                           steps=args.steps, generator=generator)
        med = statistics.median(times)
        results[name] = med
        print(f"{name:18s}: median {med:.3f} s/step ({', '.join(f'{t:.2f}' for t in times)}) -> "
              f"{args.batch_size / med:.2f} images/s; peak memory {peak_memory_mib(accelerator.device):.0f} MiB")
    ratio = results["before disc_start"] / results["after disc_start"]
    verdict = "PASS" if ratio <= 0.8 else "MISS"
    print(f"verdict: a step before disc_start costs {ratio:.2f}x a step after it (target <= 0.8x: the GAN terms and "
          f"the D step are really skipped before disc_start): {verdict}")
    print(f"verdict: throughput {args.batch_size / results['before disc_start']:.2f} images/s before, "
          f"{args.batch_size / results['after disc_start']:.2f} images/s after disc_start on {accelerator.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
