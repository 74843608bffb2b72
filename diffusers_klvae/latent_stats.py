"""Latent statistics: where ``scaling_factor``, ``shift_factor`` and ``latents_mean``/``latents_std`` come from.

:func:`compute_latent_statistics` estimates the mean and std of a VAE's raw latents (global and per channel) over N
images, with LDM's first-batch estimate and a stability check; ``klvae-stats --write-config`` stores them in a
diffusers-format model folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .cli_support import OneLineParser, run_command, writing
from .eval_data import (ImageSource, add_source_args, autocast_dtype, check_output_outside_data, iter_batches,
                        model_name, resolve_device)
from .imaging import pyplot, save_figure
from .loading import load_vae, model_config_path, update_config

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 201
HISTOGRAM_HALF_WIDTH = 8.0  # histogram range: first batch's mean ± this many of its stds (outliers go to the edge bins)
CONFIG_DIGITS = 6  # significant digits written to config.json; the estimate itself is far less precise


@dataclass
class Moments:
    """Mean and std of the latents: over everything, and per channel."""

    count: int  # images
    mean: float
    std: float
    channel_mean: list[float]
    channel_std: list[float]


@dataclass
class LatentStatistics:
    """Statistics of raw latents over ``all.count`` images.

    Attributes:
        all: :class:`Moments` over every image; ``first_half``: over the first half (stability check);
            ``first_batch``: over the first batch only (what LDM used).
        scaling_factor: ``1 / all.std``; ``shift_factor``: ``all.mean``.
        stability: relative change from the first half to all images: ``std`` (|Δstd| / std),
            ``mean`` (|Δmean| / std), ``channel_std`` and ``channel_mean`` (worst channel, same units).
        histogram: ``edges`` (bins + 1) and per-channel ``counts``; ``clipped``: values beyond the range.
        skipped, skip_reasons: images the reader refused, and how many for each reason.
        settings: resolution, posterior, data (``data``: a string; ``data_source``: a structure), model and the like.
    """

    all: Moments
    first_half: Moments
    first_batch: Moments
    scaling_factor: float
    shift_factor: float
    stability: dict[str, float]
    histogram: dict[str, Any] = field(repr=False)
    skipped: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    skip_reasons: dict[str, int] = field(default_factory=dict)  # skipped images by reason (imaging.UnreadableImage)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with writing(path):
                Path(path).write_text(text + "\n")
        return text

    def config_update(self, per_channel: bool = False) -> dict[str, Any]:
        """The config fields to store.

        Global (default): ``scaling_factor = 1/std`` and ``shift_factor = mean``, read by every diffusers pipeline
        (SD 1.x/2.x use the scale only; SD3/FLUX also the shift). ``per_channel=True``: ``latents_mean`` and
        ``latents_std`` per channel, read by SDXL-family pipelines as ``(z - mean) * scaling_factor / std``, so
        ``scaling_factor`` becomes 1.0 and ``shift_factor`` None (pipelines that ignore the per-channel fields
        would then see unscaled latents: use this mode only for pipelines that read them).
        """
        if per_channel:
            return {"latents_mean": _rounded(self.all.channel_mean), "latents_std": _rounded(self.all.channel_std),
                    "scaling_factor": 1.0, "shift_factor": None}
        return {"scaling_factor": _rounded(self.scaling_factor), "shift_factor": _rounded(self.shift_factor)}

    def to_markdown(self) -> str:
        a, h, b = self.all, self.first_half, self.first_batch
        rows = [
            "| estimate | images | mean | std | scaling_factor (1/std) |",
            "|---|---:|---:|---:|---:|",
            *(f"| {label} | {m.count} | {m.mean:.4f} | {m.std:.4f} | {1 / m.std:.5f} |"
              for label, m in (("all images", a), ("first half", h), ("first batch (LDM)", b))),
            "",
            "| channel | mean | std |",
            "|---:|---:|---:|",
            *(f"| {c} | {m:.4f} | {s:.4f} |" for c, (m, s) in enumerate(zip(a.channel_mean, a.channel_std))),
            "",
            f"Stability, first half -> all images: std {100 * self.stability['std']:.2f} %, mean "
            f"{100 * self.stability['mean']:.2f} % of std; worst channel: std {100 * self.stability['channel_std']:.2f} %, "
            f"mean {100 * self.stability['channel_mean']:.2f} % of its std.",
        ]
        if self.skipped:
            rows += ["", f"Skipped {self.skipped} images: " + ", ".join(f"{n} {r}" for r, n in sorted(self.skip_reasons.items())) + "."]
        return "\n".join(rows) + "\n"


def _rounded(value):
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return float(f"{value:.{CONFIG_DIGITS}g}")


class _Accumulator:
    """Per-image, per-channel sums in float64 (so any prefix of the images can be summarised) and a histogram."""

    def __init__(self):
        self.sums, self.squares = [], []  # each (B, C) per batch
        self.numel = 0  # values per image and channel (iter_batches gives every image one size)
        self.edges = self.counts = None  # histogram bin edges and per-channel counts, from the first batch on
        self.clipped = 0

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().double()  # (B, C, h, w)
        self.sums.append(z.sum(dim=(2, 3)).cpu())
        self.squares.append(z.square().sum(dim=(2, 3)).cpu())
        self.numel = z.shape[2] * z.shape[3]
        if self.edges is None:  # range from the first batch: latents are roughly Gaussian around it
            mean, std = z.mean().item(), max(z.std().item(), 1e-6)
            self.edges = torch.linspace(mean - HISTOGRAM_HALF_WIDTH * std, mean + HISTOGRAM_HALF_WIDTH * std, HISTOGRAM_BINS + 1, dtype=torch.float64)
            self.counts = torch.zeros(z.shape[1], HISTOGRAM_BINS, dtype=torch.long)
        low, high = self.edges[0].item(), self.edges[-1].item()
        self.clipped += int(((z < low) | (z > high)).sum())
        values = z.clamp(low, high).transpose(0, 1).reshape(z.shape[1], -1).cpu()  # (C, B*h*w)
        for c in range(values.shape[0]):
            self.counts[c] += torch.histc(values[c], bins=HISTOGRAM_BINS, min=low, max=high).long()

    def moments(self, images: int | None = None) -> Moments:
        """Moments over the first ``images`` images (all when None)."""
        sums, squares = torch.cat(self.sums)[:images], torch.cat(self.squares)[:images]  # (N, C)
        n_channel = len(sums) * self.numel  # values per channel
        channel_mean = sums.sum(0) / n_channel
        channel_var = squares.sum(0) / n_channel - channel_mean.square()
        mean = sums.sum() / (n_channel * sums.shape[1])
        var = squares.sum() / (n_channel * sums.shape[1]) - mean.square()
        return Moments(len(sums), mean.item(), var.clamp_min(0).sqrt().item(), channel_mean.tolist(),
                       channel_var.clamp_min(0).sqrt().tolist())


@torch.no_grad()
def compute_latent_statistics(
    vae_or_path,
    data,
    *,
    resolution: int = 256,
    batch_size: int = 8,
    max_images: int | None = None,
    sample_posterior: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    split: str = "validation",
    image_column: str | None = None,
    progress: bool = True,
) -> LatentStatistics:
    """Mean and std of a VAE's raw latents over a set of images (global and per channel), with a stability check.

    Args:
        batch_size (`int`, *optional*, defaults to 8): images per encoder call; the first batch is LDM's estimate.
        sample_posterior (`bool`, *optional*, defaults to `True`): posterior samples, as training pipelines encode;
            `False` uses the posterior mean (slightly smaller std).
        seed (`int`, *optional*, defaults to 0): seeds the posterior samples.
        vae_or_path, data, resolution, max_images, device, dtype, split, image_column, progress: as in
            ``evaluation.evaluate`` (``dtype``: the encoder's autocast dtype).

    Returns:
        :class:`LatentStatistics`.
    """
    from tqdm.auto import tqdm

    vae = load_vae(vae_or_path)
    device = resolve_device(device, vae_or_path)
    vae = vae.to(device).eval()
    amp_dtype = autocast_dtype(dtype)
    generator = torch.Generator(device).manual_seed(seed)
    source = ImageSource(data, split=split, image_column=image_column)
    acc, first_batch = _Accumulator(), None
    batches = iter_batches(source, resolution=resolution, batch_size=batch_size, max_images=max_images)
    for _, x in tqdm(batches, desc="latent statistics", unit="batch", disable=not progress):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            posterior = vae.encode(x.to(device=device, dtype=next(vae.parameters()).dtype)).latent_dist
            z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        acc.update(z.float())
        first_batch = first_batch or len(x)
    if first_batch is None:
        raise ValueError(f"no readable image in {source.describe()} ({source.skipped} skipped)")
    whole = acc.moments()
    if whole.count < 2:
        raise ValueError(f"latent statistics need at least 2 images, got {whole.count}")
    broken = [c for c, std in enumerate(whole.channel_std) if not std > 0]  # zero or NaN: nothing to scale by
    if broken:
        raise ValueError(f"latent channel(s) {broken} have zero or non-finite variance over {whole.count} images "
                         "(a dead channel or NaN weights): no scaling factor can be fitted")
    half, batch = acc.moments(whole.count // 2), acc.moments(first_batch)
    return LatentStatistics(
        all=whole, first_half=half, first_batch=batch, scaling_factor=1.0 / whole.std, shift_factor=whole.mean,
        stability=_stability(half, whole),
        histogram={"edges": acc.edges.tolist(), "counts": acc.counts.tolist(), "clipped": acc.clipped},
        skipped=source.skipped, skip_reasons=dict(source.skip_reasons),
        settings={"model": model_name(vae_or_path), "data": source.describe(), "data_source": source.data_source().to_dict(), "resolution": resolution,
                  "posterior": f"sample (seed {seed})" if sample_posterior else "mode", "batch_size": batch_size,
                  "latent_shape": list(z.shape[1:]), "device": str(device)},
    )


def _stability(half: Moments, whole: Moments) -> dict[str, float]:
    channel_std = [abs(h - w) / w for h, w in zip(half.channel_std, whole.channel_std)]
    channel_mean = [abs(h - w) / s for h, w, s in zip(half.channel_mean, whole.channel_mean, whole.channel_std)]
    return {"std": abs(half.std - whole.std) / whole.std, "mean": abs(half.mean - whole.mean) / whole.std,
            "channel_std": max(channel_std), "channel_mean": max(channel_mean)}


def plot_histograms(stats: LatentStatistics, path: str | os.PathLike) -> Path:
    """Per-channel histograms of the latents with the fitted N(mean, std) of each channel, as a PNG."""
    plt = pyplot()
    edges = np.asarray(stats.histogram["edges"])
    counts = np.asarray(stats.histogram["counts"], dtype=np.float64)
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    channels = counts.shape[0]
    cols = min(4, channels)
    rows = -(-channels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[channels:]:
        ax.axis("off")
    for c, ax in enumerate(axes.flat[:channels]):
        density = counts[c] / max(counts[c].sum() * width, 1e-12)
        mean, std = stats.all.channel_mean[c], stats.all.channel_std[c]
        ax.bar(centers, density, width=width, color="tab:blue", alpha=0.6)
        ax.plot(centers, np.exp(-0.5 * ((centers - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi)), color="tab:red", lw=1)
        ax.set_title(f"channel {c}: μ {mean:.3f}, σ {std:.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"raw latents over {stats.all.count} images: std {stats.all.std:.4f} -> scaling_factor "
                 f"{stats.scaling_factor:.5f}, mean {stats.all.mean:.4f}", fontsize=9)
    return save_figure(fig, path)


def write_config(model_dir: str | os.PathLike, stats: LatentStatistics, *, per_channel: bool = False) -> Path:
    """Store the statistics in a diffusers-format model folder's ``config.json`` (``vae/config.json`` of a pipeline).

    Only the fields of :meth:`LatentStatistics.config_update` change; weights are not touched.
    """
    config_path = model_config_path(model_dir, "--write-config")
    channels = json.loads(config_path.read_text()).get("latent_channels", 4)
    if per_channel and len(stats.all.channel_mean) != channels:
        raise ValueError(f"statistics have {len(stats.all.channel_mean)} channels, the model {channels}")
    update_config(config_path, stats.config_update(per_channel))
    return config_path


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="klvae-stats", description=(
        "Latent statistics of a VAE (global and per-channel mean/std, stability, histograms): the source of "
        "scaling_factor = 1/std, shift_factor and latents_mean/latents_std."))
    parser.add_argument("--model", required=True, help="diffusers folder, single file, preset name or Hub id")
    add_source_args(parser, min_images=2)
    parser.add_argument("--mode", action="store_true", help="use the posterior mean instead of a seeded sample")
    parser.add_argument("--output", default=None, help="folder for latent_stats.json and latent_histogram.png")
    parser.add_argument("--write-config", action="store_true",
                        help="store scaling_factor (1/std) and shift_factor (mean) in the model folder's config.json")
    parser.add_argument("--per-channel", action="store_true",
                        help="with --write-config: store latents_mean/latents_std (SDXL-style) instead, scaling_factor 1.0")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``klvae-stats``: the table on stdout; a user error is one line on stderr and exit status 2."""
    return run_command(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> None:
    if args.per_channel and not args.write_config:
        raise ValueError("--per-channel only applies with --write-config")
    if args.write_config:
        model_config_path(args.model, "--write-config")  # before the long computation
    if args.output:
        check_output_outside_data(args.output, args.data)
    stats = compute_latent_statistics(
        args.model, args.data, resolution=args.resolution, batch_size=args.batch_size, max_images=args.max_images,
        sample_posterior=not args.mode, seed=args.seed, device=args.device, dtype=args.dtype, split=args.split,
        image_column=args.image_column,
    )
    sys.stdout.write(stats.to_markdown())  # the command's product, pipeable (skipped images counted in its last line)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        stats.to_json(out / "latent_stats.json")
        plot_histograms(stats, out / "latent_histogram.png")
        logger.info("wrote %s and %s", out / "latent_stats.json", out / "latent_histogram.png")
    if args.write_config:
        path = write_config(args.model, stats, per_channel=args.per_channel)
        logger.info("stored %s in %s", stats.config_update(args.per_channel), path)


if __name__ == "__main__":
    sys.exit(main())
