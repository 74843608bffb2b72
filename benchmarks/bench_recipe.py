"""The recipe's learning curve on a fixed small budget: held-out PSNR / LPIPS against images seen and wall time.

    python benchmarks/bench_recipe.py [--steps 400] [--eval_every 100] [--output_dir outputs/bench_recipe]

Trains the ``small`` preset from scratch with the full recipe (L2 + 0.5 LPIPS-VGG + 1e-6 KL at LDM's scale, the
PatchGAN for the last 12% of the budget, EMA, cosine rate: the shape of ``pretrained/klvae-small-photos``'s run)
through ``train_autoencoder.py`` on the bundled photos (random 128² crops at zooms 1-4), and scores the EMA weights every ``--eval_every`` steps on the two held-out photos (``astronaut.jpg``,
``chelsea.jpg``: never trained on) at 128². Prints one line per point and writes ``curve.png`` and ``curve.json``.
Same seed, same data, same budget: a later change to the loss, the optimizer or the data pipeline is judged by
whether this curve moves up (PSNR) and down (LPIPS) at the same images seen and wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HELD_OUT = ["astronaut.jpg", "chelsea.jpg"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=4e-4)
    parser.add_argument("--output_dir", default="outputs/bench_recipe")
    args = parser.parse_args()

    import train_autoencoder

    from diffusers_klvae.train_outputs import plot_validation_curve

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"bench_recipe.py: error: {out} is not empty; a curve must start from scratch (remove it or pass --output_dir)")
    photos = ROOT / "assets" / "photos"
    argv = ["--preset", "small", "--data_files", str(photos / "*.jpg"), str(ROOT / "assets" / "pretrain" / "*.jpg"),
            "--validation_images", *[str(photos / name) for name in HELD_OUT],
            "--resolution", "128", "--crop_zoom", "1", "4", "--random_flip", "--train_batch_size", str(args.batch_size),
            "--learning_rate", str(args.learning_rate), "--disc_learning_rate", str(args.learning_rate),
            "--lr_scheduler", "cosine", "--lr_warmup_steps", str(min(100, args.steps // 10)), "--max_train_steps", str(args.steps),
            "--disc_start", str(args.steps * 22 // 25), "--use_ema", "--ema_decay", "0.999",
            "--validation_steps", str(args.eval_every), "--checkpointing_steps", str(args.steps),
            "--checkpoints_total_limit", "1", "--seed", "0", "--report_to", "none", "--output_dir", str(out)]
    train_autoencoder.main(argv)

    points = [json.loads(line) for line in (out / "validation" / "metrics.jsonl").read_text().splitlines()]
    print(f"{'step':>6} {'images':>8} {'seconds':>8} {'PSNR dB':>8} {'LPIPS':>7}")  # noqa: T201
    for p in points:
        print(f"{p['step']:>6} {p['images_seen']:>8} {p['train_seconds']:>8.0f} {p['psnr']:>8.2f} {p['lpips']:>7.4f}")  # noqa: T201
    (out / "curve.json").write_text(json.dumps(points, indent=1))
    plot_validation_curve(points, out / "curve.png")
    print(f"wrote {out / 'curve.png'} and {out / 'curve.json'}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
