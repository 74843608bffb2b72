"""``make demo``: the package's main job on an embedded default, in a few minutes on a laptop CPU.

Starts from the bundled pretrained model (``pretrained/klvae-small-photos``: the ``small`` preset trained from
scratch with this package's recipe), then:

1. reconstructs the two photos it never saw (``astronaut.jpg``, ``chelsea.jpg``, 256² center crops);
2. fine-tunes it on a new "domain", medical images (``assets/domain``: a fundus photograph and a microscopy
   slide, never seen in pretraining), the way one adapts a VAE without breaking the latents a UNet knows:
   decoder only, EMA, the PatchGAN on from the first step, through the real ``train_autoencoder.py`` code path.
   It trains on the left two thirds of each image and is scored before and after on 128² tiles of the right third;
3. stages the result for the Hub with ``klvae-push --dry-run`` (nothing is uploaded).

Writes to ``outputs/demo/``: ``photos.png`` and ``domain.png`` (rows: original | reconstructions | amplified
errors), ``loss_curve.png``, ``metrics.md`` / ``metrics.json``, ``run/`` (the fine-tuned model, EMA as the
``ema`` variant, checkpoints, model card) and ``staged/`` (the Hub folder).

Usage: ``python examples/demo.py [--steps 40] [--output_dir outputs/demo] [--from_scratch]``;
``--from_scratch`` trains a fresh ``small`` preset on the bundled photos instead (the pretraining recipe on a
demo budget: expect blurry reconstructions after a few minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent  # the repository (train_autoencoder.py, assets/, pretrained/)
PRETRAINED = ROOT / "pretrained" / "klvae-small-photos"
PHOTOS = ROOT / "assets" / "photos"
HELD_OUT_PHOTOS = ("astronaut.jpg", "chelsea.jpg")  # held out of the pretrained model's training set
DOMAIN = ROOT / "assets" / "domain"
PHOTO_RESOLUTION = 256  # the pretrained model's card reports 256² center crops
TILE = 128  # fine-tuning crops and held-out domain tiles
TRAIN_FRACTION = 2 / 3  # of each domain image's width, from the left; the rest is held out
MIN_TILE_BRIGHTNESS = -0.8  # mean in [-1, 1]: tiles darker than this are the fundus' black surround
MARKER = ".klvae-demo"  # a folder holding this file was made by the demo and may be replaced by it
SEED = 0


def prepare_output(out: Path) -> None:
    """A fresh output folder; an older demo run is replaced, any other non-empty folder is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            sys.exit(f"demo: error: {out} is not empty and was not made by the demo; pass another --output_dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python examples/demo.py\n")


def split_domain(folder: Path) -> torch.Tensor:
    """Writes the left part of each domain image to ``folder`` (training); returns 128² tiles of the rest, at full
    size and at half size (more context per tile), without the near-black ones -> (N, 3, 128, 128) in [-1, 1]."""
    from PIL import Image

    from diffusers_klvae.imaging import load_image, to_tensor

    folder.mkdir(parents=True)
    tiles = []
    for path in sorted(DOMAIN.glob("*.jpg")):
        img = load_image(path)
        cut = round(img.width * TRAIN_FRACTION)
        img.crop((0, 0, cut, img.height)).save(folder / f"{path.stem}.png")
        held = img.crop((cut, 0, img.width, img.height))
        for scale in (1.0, 0.5):
            view = held.resize((round(held.width * scale), round(held.height * scale)), Image.BICUBIC) if scale != 1 else held
            for top in range(0, view.height - TILE + 1, TILE):
                for left in range(0, view.width - TILE + 1, TILE):
                    tile = to_tensor(view.crop((left, top, left + TILE, top + TILE)))
                    if tile.mean() > MIN_TILE_BRIGHTNESS:
                        tiles.append(tile)
    return torch.stack(tiles)


def center_crops(paths, resolution: int) -> torch.Tensor:
    from diffusers_klvae.imaging import load_image, resize_and_crop, to_tensor

    return torch.stack([to_tensor(resize_and_crop(load_image(p), resolution)) for p in paths])


def score(vae, images: torch.Tensor, lpips_model) -> tuple[dict[str, float], torch.Tensor]:
    """Mean PSNR / SSIM / LPIPS of the model's reconstructions (evaluation protocol: posterior mode, uint8)."""
    from diffusers_klvae.evaluation import lpips_distance, psnr, ssim
    from diffusers_klvae.imaging import to_uint8
    from diffusers_klvae.train_outputs import reconstruct_batched

    recs = reconstruct_batched(vae, images)
    x, y = to_uint8(images), to_uint8(recs)
    return {"psnr": float(psnr(x, y).mean()), "ssim": float(ssim(x, y).mean()),
            "lpips": float(lpips_distance(x, y, lpips_model).mean())}, recs


def table(rows: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| model | PSNR (dB) ↑ | SSIM ↑ | LPIPS ↓ |", "|---|---|---|---|"]
    return lines + [f"| {name} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['lpips']:.3f} |" for name, m in rows.items()]


def run_training(argv: list[str]) -> float:
    """``train_autoencoder.main(argv)`` (the script's own code path); returns the seconds it took."""
    sys.path.insert(0, str(ROOT))
    import train_autoencoder

    start = time.perf_counter()
    train_autoencoder.main(argv)
    return time.perf_counter() - start


def fine_tune_demo(args, out: Path, lpips_model) -> dict:
    from diffusers_klvae import KLVAE
    from diffusers_klvae.hub import main as klvae_push
    from diffusers_klvae.imaging import reconstruction_grid

    if not (PRETRAINED / "config.json").is_file():
        sys.exit(f"demo: error: no pretrained model at {PRETRAINED}; run with --from_scratch")
    pretrained = KLVAE.from_pretrained(PRETRAINED, torch_dtype=torch.float32)

    # 1) held-out photos, straight from the pretrained model
    photos = center_crops([PHOTOS / name for name in HELD_OUT_PHOTOS], PHOTO_RESOLUTION)
    photo_scores, photo_recs = score(pretrained, photos, lpips_model)
    reconstruction_grid(photos, [photo_recs]).save(out / "photos.png")

    # 2) the domain: decoder-only fine-tune with EMA and the GAN on, scored on held-out tiles
    tiles = split_domain(out / "domain_train")
    argv = ["--pretrained_model_name_or_path", str(PRETRAINED), "--train_data_dir", str(out / "domain_train"),
            "--decoder_only", "--resolution", str(TILE), "--crop_zoom", "1", "2", "--random_flip",
            "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps),
            "--learning_rate", str(args.learning_rate), "--disc_learning_rate", str(args.learning_rate),
            "--disc_start", "0",  # the pretrained decoder is already sharp: the GAN can start at once
            "--use_ema", "--ema_decay", "0.95",  # a short run: an EMA horizon of ~20 steps
            "--num_validation_images", "0", "--checkpointing_steps", str(args.steps), "--checkpoints_total_limit", "1",
            "--report_to", "tensorboard", "--seed", str(SEED), "--output_dir", str(out / "run")]
    train_s = run_training(argv)
    tuned = KLVAE.from_pretrained(out / "run", variant="ema")
    rows = {}
    rows["pretrained"], before = score(pretrained, tiles, lpips_model)
    rows["fine-tuned (EMA)"], after = score(tuned, tiles, lpips_model)
    shown = torch.linspace(0, len(tiles) - 1, min(6, len(tiles))).long()
    reconstruction_grid(tiles[shown], [before[shown], after[shown]]).save(out / "domain.png")
    shutil.copy(out / "run" / "loss_curve.png", out / "loss_curve.png")
    photos_after, _ = score(tuned, photos, lpips_model)

    # 3) what klvae-push would upload (nothing leaves the machine)
    klvae_push([str(out / "run"), "--repo-id", "your-name/klvae-small-medical", "--dry-run", "--folder", str(out / "staged"),
                "--images", str(out / "domain.png"), str(out / "loss_curve.png"), "--license", "apache-2.0"])

    lines = [f"Pretrained model: {PRETRAINED.relative_to(ROOT)}; LPIPS VGG ({lpips_model.weights_source}).", "",
             f"Held-out photos ({', '.join(HELD_OUT_PHOTOS)}, {PHOTO_RESOLUTION}² center crops, never trained on):", "",
             *table({"pretrained": photo_scores, "after the domain fine-tune": photos_after}), "",
             f"Domain: {len(tiles)} held-out {TILE}² tiles of {', '.join(p.name for p in sorted(DOMAIN.glob('*.jpg')))} "
             f"(right third; training saw the left two thirds); decoder-only fine-tune, {args.steps} steps of batch "
             f"{args.batch_size}, GAN on, EMA, in {train_s:.0f} s:", "", *table(rows)]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    result = {"steps": args.steps, "train_seconds": train_s, "photos": {"pretrained": photo_scores, "fine-tuned": photos_after},
              "domain": rows}
    gain = rows["fine-tuned (EMA)"]["psnr"] - rows["pretrained"]["psnr"]
    print("\n" + "\n".join(lines) + f"\n\nDomain PSNR {rows['pretrained']['psnr']:.2f} -> {rows['fine-tuned (EMA)']['psnr']:.2f} dB "  # noqa: T201
          f"({gain:+.2f} dB). Wrote {out}/photos.png, domain.png, loss_curve.png, metrics.md; the model in {out}/run, "
          f"its Hub folder in {out}/staged.")
    return result


def from_scratch_demo(args, out: Path, lpips_model) -> dict:
    from diffusers_klvae import KLVAE
    from diffusers_klvae.imaging import reconstruction_grid

    torch.manual_seed(SEED)
    KLVAE.from_preset("small").save_pretrained(out / "untrained")  # "before" is exactly the starting point
    argv = ["--pretrained_model_name_or_path", str(out / "untrained"), "--train_data_dir", str(PHOTOS),
            "--validation_images", *[str(PHOTOS / name) for name in HELD_OUT_PHOTOS],
            "--resolution", str(TILE), "--crop_zoom", "1", "4", "--random_flip", "--train_batch_size", str(args.batch_size),
            "--max_train_steps", str(args.steps), "--learning_rate", "4e-4", "--disc_learning_rate", "4e-4",
            "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "10",
            "--disc_start", str(args.steps * 3 // 4), "--use_ema", "--ema_decay", "0.98",
            "--validation_steps", str(max(1, args.steps // 3)), "--checkpointing_steps", str(args.steps),
            "--checkpoints_total_limit", "1", "--report_to", "tensorboard", "--seed", str(SEED), "--output_dir", str(out / "run")]
    train_s = run_training(argv)
    photos = center_crops([PHOTOS / name for name in HELD_OUT_PHOTOS], PHOTO_RESOLUTION)
    rows, recs = {}, []
    for name, folder, variant in [("untrained", out / "untrained", None), ("trained (EMA)", out / "run", "ema")]:
        rows[name], rec = score(KLVAE.from_pretrained(folder, variant=variant), photos, lpips_model)
        recs.append(rec)
    reconstruction_grid(photos, recs).save(out / "photos.png")
    shutil.copy(out / "run" / "loss_curve.png", out / "loss_curve.png")
    lines = [f"From scratch: {args.steps} steps of batch {args.batch_size} in {train_s:.0f} s; held-out photos "
             f"({', '.join(HELD_OUT_PHOTOS)}, {PHOTO_RESOLUTION}² center crops):", "", *table(rows)]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\n\nWrote {out}/photos.png, loss_curve.png, metrics.md and the model in {out}/run.")  # noqa: T201
    return {"steps": args.steps, "train_seconds": train_s, "photos": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 40 fine-tuning, 150 from scratch)")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="fine-tuning rate of the decoder")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--from_scratch", action="store_true", help="train a fresh small preset instead of fine-tuning")
    args = parser.parse_args(argv)
    args.steps = args.steps or (150 if args.from_scratch else 40)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    from diffusers_klvae.perceptual import load_lpips

    out = Path(args.output_dir)
    prepare_output(out)
    lpips_model = load_lpips("vgg")
    result = (from_scratch_demo if args.from_scratch else fine_tune_demo)(args, out, lpips_model)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
