"""``make demo``: the package's main job on an embedded default, in a few minutes on a laptop CPU.

Trains the ``small`` preset (KL-f8, 256² -> 32²x4 shape family) on the photos bundled in ``assets/photos``
(random 128² crops; the first two photos of the folder are held out for validation) through the real
``train_autoencoder.py`` code path (its ``main(argv)``), with the real LPIPS (VGG, offline weights when the
network is unreachable), then writes to ``outputs/demo/``:

- ``reconstructions.png``: held-out crops, rows original | untrained | trained (EMA) | their amplified errors;
- ``loss_curve.png``: the loss terms over training;
- ``metrics.md`` / ``metrics.json``: PSNR / SSIM / LPIPS on held-out crops before vs after training;
- ``run/``: the training folder (final model, EMA, checkpoints, validation grids, model card).

Usage: ``python -m diffusers_klvae.demo [--steps 60] [--output_dir outputs/demo]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent  # the repository (train_autoencoder.py, assets/)
PHOTOS = ROOT / "assets" / "photos"
RESOLUTION = 128  # crops small enough for a CPU, large enough for an f8 model (16² latents)
HELD_OUT = 2  # photos kept out of training, scored before and after
ZOOMS = (1.0, 1.25, 1.5, 2.0)  # held-out crops per photo: the training view and three closer ones
SEED = 0


def _train_autoencoder():
    """The top-level script as a module (the demo runs its real code path, not a copy)."""
    spec = importlib.util.spec_from_file_location("train_autoencoder", ROOT / "train_autoencoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def held_out_crops(paths, *, resolution: int, zooms=ZOOMS) -> torch.Tensor:
    """Center crops of each photo at several zoom levels -> (N, 3, res, res) in [-1, 1].

    Zoom 1 is the view training uses (shorter side resized to ``resolution``); larger zooms resize the shorter side
    to ``zoom * resolution`` first, so each crop shows finer detail (and a square photo still gives distinct crops).
    """
    from PIL import Image

    from .imaging import load_image, to_tensor

    crops = []
    for path in paths:
        img = load_image(path)
        for zoom in zooms:
            side = round(resolution * zoom)
            scale = side / min(img.size)
            view = img.resize((max(side, round(img.width * scale)), max(side, round(img.height * scale))), Image.BICUBIC)
            left, top = (view.width - resolution) // 2, (view.height - resolution) // 2
            crops.append(to_tensor(view.crop((left, top, left + resolution, top + resolution))))
    return torch.stack(crops)


def score(vae, images: torch.Tensor, lpips_model) -> dict[str, float]:
    """Mean PSNR / SSIM / LPIPS of the model's reconstructions (evaluation protocol: mode, uint8)."""
    from .evaluation import lpips_distance, psnr, ssim
    from .imaging import to_uint8
    from .training import reconstruct

    recs = reconstruct(vae, images)
    x, y = to_uint8(images), to_uint8(recs)
    return {"psnr": float(psnr(x, y).mean()), "ssim": float(ssim(x, y).mean()),
            "lpips": float(lpips_distance(x, y, lpips_model).mean())}, recs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (a few seconds each on 2 CPU cores)")
    parser.add_argument("--learning_rate", type=float, default=8e-4)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    from . import KLVAE
    from .imaging import reconstruction_grid
    from .perceptual import load_lpips

    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)  # a demo run starts clean (no resume from an older run)
    out.mkdir(parents=True)
    from .data import load_image_dataset, take_validation_images

    # the photos training holds out (the first of the unshuffled folder), to score them with more crops
    names = take_validation_images(load_image_dataset(train_data_dir=PHOTOS), HELD_OUT, resolution=RESOLUTION).names
    held_out = [PHOTOS / name for name in names]

    # the untrained model is saved and trained from, so "before" is exactly the starting point
    torch.manual_seed(SEED)
    KLVAE.from_preset("small").save_pretrained(out / "untrained")
    argv_train = [
        "--pretrained_model_name_or_path", str(out / "untrained"), "--train_data_dir", str(PHOTOS),
        "--resolution", str(RESOLUTION), "--random_flip", "--train_batch_size", str(args.batch_size),
        "--max_train_steps", str(args.steps), "--learning_rate", str(args.learning_rate),  # from scratch: LDM's 4.5e-6 is far too slow
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "10",
        "--disc_start", str(10 * args.steps),  # a GAN needs many more steps than a demo has: off
        "--use_ema", "--ema_decay", "0.98",  # short run: a short EMA horizon (~50 steps)
        "--num_validation_images", str(HELD_OUT), "--validation_steps", str(max(1, args.steps // 3)),
        "--checkpointing_steps", str(max(1, args.steps // 2)), "--checkpoints_total_limit", "1",
        "--report_to", "tensorboard", "--seed", str(SEED), "--output_dir", str(out / "run"),
    ]
    start = time.perf_counter()
    _train_autoencoder().main(argv_train)
    train_s = time.perf_counter() - start

    lpips_model = load_lpips("vgg")
    crops = held_out_crops(held_out, resolution=RESOLUTION)
    rows = {}
    recs = []
    for name, folder, variant in [("untrained", out / "untrained", None), ("trained", out / "run", None), ("trained (EMA)", out / "run", "ema")]:
        rows[name], rec = score(KLVAE.from_pretrained(folder, variant=variant), crops, lpips_model)
        recs.append(rec)
    shown = slice(None, None, 2)  # zooms 1 and 1.5 of each photo
    reconstruction_grid(crops[shown], [recs[0][shown], recs[2][shown]]).save(out / "reconstructions.png")
    shutil.copy(out / "run" / "loss_curve.png", out / "loss_curve.png")

    lines = [f"Held-out crops: {len(crops)} crops of {RESOLUTION}² from {', '.join(p.name for p in held_out)} "
             f"(never trained on); {args.steps} steps of batch {args.batch_size} in {train_s:.0f} s; LPIPS VGG "
             f"({lpips_model.weights_source}).", "", "| model | PSNR (dB) ↑ | SSIM ↑ | LPIPS ↓ |", "|---|---|---|---|"]
    lines += [f"| {name} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['lpips']:.3f} |" for name, m in rows.items()]
    table = "\n".join(lines) + "\n"
    (out / "metrics.md").write_text(table)
    (out / "metrics.json").write_text(json.dumps({"steps": args.steps, "train_seconds": train_s, "metrics": rows}, indent=2))
    gain = rows["trained (EMA)"]["psnr"] - rows["untrained"]["psnr"]
    summary = (f"\n{table}\nPSNR on held-out crops: {rows['untrained']['psnr']:.2f} dB untrained -> "
               f"{rows['trained (EMA)']['psnr']:.2f} dB trained (EMA), {gain:+.2f} dB.\n"
               f"Wrote {out / 'reconstructions.png'}, {out / 'loss_curve.png'}, {out / 'metrics.md'} "
               f"and the trained model in {out / 'run'} (EMA weights: variant=\"ema\").")
    print(summary)  # noqa: T201 - the demo's output is for the person who ran it
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
