"""What a training run writes besides its checkpoints and arguments: validation grids and metrics, loss and validation
curves, the final model (raw weights + the ``ema`` variant) with its model card, and the progress display.

Main process only, unless a function says otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .imaging import pyplot, save_figure
from .loading import ema_weights, looks_like_hub_id, save_model_folder
from .train_config import TrainConfig

logger = logging.getLogger(__name__)

VALIDATION_FOLDER, METRICS_FILE = "validation", "metrics.jsonl"  # output_dir/validation/{step-<step>.png, metrics.jsonl}


# --------------------------------------------------------------------------------------- validation and curves


@torch.no_grad()
def reconstruct_batched(vae, images: torch.Tensor, *, batch_size: int = 8, autocast=None) -> torch.Tensor:
    """[-1, 1] images -> reconstructions from the posterior mode (the evaluation protocol), float32 on the CPU."""
    from .evaluation import reconstruct

    was_training = vae.training
    vae.eval()
    outs = []
    for chunk in images.split(batch_size):
        with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
            outs.append(reconstruct(vae, chunk).float().cpu())
    vae.train(was_training)
    return torch.cat(outs)


def run_validation(accelerator, vae, ema, images: torch.Tensor, step: int, output_dir: str | os.PathLike, *,
                   lpips_model=None, extra: dict[str, Any] | None = None) -> dict[str, float]:
    """Reconstruct the validation images (EMA weights when ``ema`` is given), write the grid and the metrics.

    Main process only (the unwrapped model, no collectives). Writes ``validation/step-<step>.png`` (rows:
    original | reconstruction | amplified error) and appends a line to ``validation/metrics.jsonl``; logs both
    to the trackers.

    Args:
        vae: the prepared or unwrapped VAE.
        ema (`EMAModel`, *optional*): when given, validation uses its weights (and says so: ``weights="ema"``).
        images (`torch.Tensor`): (N, 3, H, W) in [-1, 1].
        lpips_model (*optional*): an LPIPS module taking [-1, 1] images (the training loss's own, ``loss_fn.perceptual``).
        extra (`dict`, *optional*): more fields for the metrics line (e.g. ``images_seen``, ``train_seconds``).

    Returns:
        dict with ``psnr``, ``ssim``, ``lpips`` (when a model is given), ``weights``.
    """
    from .metrics import lpips_distance, psnr, ssim
    from .imaging import reconstruction_grid, to_uint8

    raw = accelerator.unwrap_model(vae)
    with ema_weights(ema, raw):
        recs = reconstruct_batched(raw, images, autocast=accelerator.autocast)
    originals, quantized = to_uint8(images), to_uint8(recs)  # the protocol scores the uint8 pictures
    metrics: dict[str, Any] = {"step": step, **(extra or {}), "weights": "ema" if ema is not None else "raw", "count": int(images.shape[0]),
                               "psnr": float(psnr(originals, quantized).mean()),
                               "ssim": float(ssim(originals, quantized).mean())}
    if lpips_model is not None:
        metrics["lpips"] = float(lpips_distance(originals, quantized, lpips_model).mean())
    bad = int((~torch.isfinite(recs)).sum())
    if bad:  # a diverged model: its NaN pixels were scored as black ones, numbers that look like a (bad) result
        metrics.update({k: float("nan") for k in ("psnr", "ssim", "lpips") if k in metrics})
        logger.warning("step %d validation: the reconstructions hold %d NaN/Inf values (the model diverged?): "
                       "metrics recorded as NaN", step, bad)

    folder = Path(output_dir) / VALIDATION_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    grid = reconstruction_grid(images, [recs])
    grid_path = folder / f"step-{step:07d}.png"
    grid.save(grid_path)
    with open(folder / METRICS_FILE, "a") as f:
        f.write(json.dumps(metrics) + "\n")
    accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=step)
    log_image(accelerator, "val/reconstructions", grid, step)
    logger.info("step %d validation (%s weights): %s", step, metrics["weights"],
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    metrics["grid"] = os.fspath(grid_path)
    return metrics


def set_aside_validation(output_dir: str | os.PathLike, step: int, aside: str | os.PathLike) -> list[int]:
    """Move the validation outputs of the steps after ``step`` (a branch of the run that a resume abandons) to
    ``aside/validation/``: their grids and their ``metrics.jsonl`` lines (the other lines stay, in order). Returns
    the steps moved, sorted; ``aside`` is created only if there is something to move."""
    folder, target = Path(output_dir) / VALIDATION_FOLDER, Path(aside) / VALIDATION_FOLDER
    grids = {p: int(m.group(1)) for p in folder.glob("step-*.png") if (m := re.fullmatch(r"step-(\d+)\.png", p.name))}
    grids = {p: s for p, s in grids.items() if s > step}
    metrics = folder / METRICS_FILE
    lines = metrics.read_text().splitlines(keepends=True) if metrics.is_file() else []
    later = {i for i, line in enumerate(lines) if (_line_step(line) or 0) > step}  # unreadable lines stay
    if not grids and not later:
        return []
    target.mkdir(parents=True, exist_ok=True)
    for path in grids:
        shutil.move(os.fspath(path), os.fspath(target / path.name))
    if later:  # the moved lines are written before the kept ones replace the file: a kill loses none
        with open(target / METRICS_FILE, "a") as f:
            f.write("".join(lines[i] for i in sorted(later)))
        tmp = metrics.with_name(f".{METRICS_FILE}.tmp")
        tmp.write_text("".join(line for i, line in enumerate(lines) if i not in later))
        os.replace(tmp, metrics)
    return sorted(set(grids.values()) | {_line_step(lines[i]) for i in later})


def _line_step(line: str) -> int | None:
    """The step of a ``metrics.jsonl`` line (None for a line that is not one)."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if type(step) is int else None


def log_image(accelerator, name: str, image, step: int) -> None:
    """A PIL image to every tracker that takes images (tensorboard, wandb)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(image)]}, step=step)


def plot_loss_curve(history: Sequence[dict[str, float]], path: str | os.PathLike) -> Path | None:
    """Loss terms over steps -> a PNG (matplotlib, Agg backend: no display needed). None if history is empty."""
    if not history:
        return None
    plt = pyplot()
    keys = [k for k in history[-1] if k not in ("step", "lr")]
    keys = [k for k in keys if len({h.get(k) for h in history}) > 1] or keys  # GAN terms are flat 0 before disc_start
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 1.9 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        ax.plot(steps, [h.get(key, float("nan")) for h in history], lw=1)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    return save_figure(fig, path)


def plot_validation_curve(points: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Held-out PSNR and LPIPS against images seen and training seconds (``validation/metrics.jsonl`` lines) -> PNG."""
    plt = pyplot()
    metrics = [m for m in ("psnr", "lpips") if all(m in p for p in points)]
    x_keys = [k for k in ("images_seen", "train_seconds") if all(k in p for p in points)]
    fig, axes = plt.subplots(len(metrics), len(x_keys), figsize=(4.5 * len(x_keys), 2.6 * len(metrics)), squeeze=False)
    for row, metric in enumerate(metrics):
        for col, x_key in enumerate(x_keys):
            ax = axes[row, col]
            ax.plot([p[x_key] for p in points], [p[metric] for p in points], marker="o", lw=1)
            ax.set_xlabel("images seen" if x_key == "images_seen" else "training seconds")
            ax.set_ylabel(f"held-out {metric.upper()}" + (" (dB)" if metric == "psnr" else ""))
            ax.grid(alpha=0.3)
    return save_figure(fig, path)


# -------------------------------------------------------------------- the end of a run: final model, card, Hub


def finish(accelerator, vae, ema, cfg: TrainConfig, *, history: Sequence[dict], metrics: dict, hub_futures=(), hub_api=None) -> None:
    """End of training (main process): final model + EMA, loss curve, model card, and ``--push_to_hub``
    (through ``hub_api``, a ``huggingface_hub.HfApi``; a new one when `None`)."""
    from . import hub
    from .model_card import render_model_card
    from .eval_results import validation_result

    out, raw = Path(cfg.output_dir), accelerator.unwrap_model(vae)
    save_model_folder(raw, out, ema=ema)
    curve = plot_loss_curve(history, out / "loss_curve.png")
    images = [p for p in (metrics.get("grid"), curve) if p]
    card_metrics = None
    if metrics:  # the last validation: a few held-out images, said so in the card's protocol line
        card_metrics = validation_result({k: metrics[k] for k in ("psnr", "ssim", "lpips") if k in metrics},
                                         count=metrics["count"], resolution=cfg.resolution, weights=metrics["weights"],
                                         step=metrics["step"])
    base_model = cfg.pretrained_model_name_or_path if _looks_like_hub_id(cfg.pretrained_model_name_or_path) else None
    datasets = [cfg.dataset_name] if _looks_like_hub_id(cfg.dataset_name) else None
    card = render_model_card(raw, repo_id=cfg.hub_model_id or f"your-name/{out.resolve().name}", metrics=card_metrics,
                                 images=[os.path.relpath(p, out) for p in images], training_args=cfg.to_dict(),
                                 base_model=base_model, datasets=datasets, has_ema=ema is not None)
    card.save(out / "README.md")
    for future in hub_futures:  # checkpoint uploads: report failures, never lose the final model for them
        try:
            logger.info("checkpoint pushed: %s", future.result())
        except Exception as err:  # noqa: BLE001 - an upload error must not hide the trained model
            logger.error("checkpoint upload failed: %s", err)
    if cfg.push_to_hub:
        url = hub.publish(raw, cfg.hub_model_id, metrics=card_metrics, images=images, training_args=cfg.to_dict(),
                          base_model=base_model, datasets=datasets, private=cfg.hub_private, ema_vae=ema, api=hub_api)
        logger.info("pushed to the Hub: %s", url)


def _looks_like_hub_id(value: str | None) -> bool:
    """A Hub repo id (org/name, not a local path): what a card's ``base_model`` / ``datasets`` may name."""
    return bool(value) and not Path(value).exists() and looks_like_hub_id(value) and value.count("/") == 1


# ----------------------------------------------------------------------------- progress display and debug logs


_POSTFIX_KEYS = {"loss": "loss", "rec": "rec", "lpips": "lpips", "kl": "kl", "g": "g", "d_loss": "d",
                 "images_per_s": "img/s", "skipped": "skipped"}


def postfix(logs: dict[str, float]) -> dict[str, str]:
    """The progress bar's short view of the step's logs (whatever prefix the loss module gives its keys)."""
    named = ((_POSTFIX_KEYS.get(key.split("/")[-1]), value) for key, value in logs.items())
    return {name: f"{value:.3g}" if name != "skipped" else str(int(value)) for name, value in named if name is not None}


def log_seen_images(path: Path, images: torch.Tensor) -> None:
    """Debug (``--debug_process_logs``): append one content hash per image (uint8 pixels) to ``path``."""
    import hashlib

    from .imaging import to_uint8

    with open(path, "a") as f:
        for img in to_uint8(images.cpu()):
            f.write(hashlib.sha1(img.numpy().tobytes()).hexdigest()[:16] + "\n")


def dump_process_weights(accelerator, vae, loss_fn, path: Path) -> None:
    """Debug (``--debug_process_logs``): this process's VAE weights and the loss's own parameters (``loss.<i>``),
    to check that replicas agree."""
    from safetensors.torch import save_file

    tensors = {**accelerator.unwrap_model(vae).state_dict(),
               **{f"loss.{i}": p for i, p in enumerate(loss_fn.trainable_parameters())}}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)
