"""Evaluation results and the files ``klvae-eval`` writes: :class:`EvaluationResult`, the markdown table, JSON, CSV.

``evaluation`` re-exports every public name here (``from diffusers_klvae.evaluation import EvaluationResult``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .cli_support import writing
from .metrics import SSIM_KERNEL_SIZE, SSIM_SIGMA


@dataclass
class MetricSummary:
    """Mean ± std (population std over images) of one metric; set-level metrics (rFID) have ``std=None``."""

    mean: float
    std: float | None
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "MetricSummary":
        array = np.asarray(values, dtype=np.float64)
        array = array[~np.isnan(array)]  # NaN = metric undefined for that image (e.g. a mask without holes)
        if array.size == 0:
            return cls(float("nan"), None, 0)
        if not np.isfinite(array).all():  # identical images: PSNR +inf; the mean is inf, the spread undefined
            return cls(float(array.mean()), None, int(array.size))
        return cls(float(array.mean()), float(array.std()), int(array.size))

    def format(self, digits: int) -> str:
        if self.count == 0:
            return "–"
        text = f"{self.mean:.{digits}f}"
        return text if self.std is None else f"{text} ± {self.std:.{digits}f}"


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured on one model.

    Attributes:
        model: a name for the model (its spec).
        metrics: metric key -> :class:`MetricSummary` (``psnr``, ``ssim``, ``lpips``, ``rfid``,
            ``masked_psnr_kept``, ``masked_psnr_hole``; only those requested).
        count: images evaluated; ``skipped``: unreadable images left out (``skipped_names`` says which,
            ``skip_reasons`` counts them by reason: "undecodable", "decompression bomb", "dangling symlink"...).
        settings: the protocol (``settings["protocol"]``), the data source (``settings["data"]``, a string, and
            ``settings["data_source"]``, a structure such as ``{"kind": "hf-dataset", "name": ..., "split": ...}``)
            and every option used.
        per_image: metric key -> one value per image, in ``image_names`` order.
        timings: seconds per stage (load, reconstruct, and each metric).
        samples: the first ``keep_images`` originals and reconstructions (float [-1, 1], CPU), for grids.
    """

    model: str
    metrics: dict[str, MetricSummary]
    count: int
    skipped: int
    settings: dict[str, Any]
    per_image: dict[str, list[float]]
    image_names: list[str]
    skipped_names: list[str] = field(default_factory=list)
    skip_reasons: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    samples: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("samples")
        return _json_safe(data)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """JSON text (``+inf`` PSNR written as the string ``"inf"``, undefined values as ``null``); also written to ``path``."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def to_markdown(self) -> str:
        return results_table([self])


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


_COLUMNS = (  # (metric key, header, digits)
    ("psnr", "PSNR ↑", 2),
    ("ssim", "SSIM ↑", 3),
    ("lpips", "LPIPS ↓", 3),
    ("rfid", "rFID ↓", 2),
    ("masked_psnr_kept", "masked PSNR kept ↑", 2),
    ("masked_psnr_hole", "masked PSNR hole ↑", 2),
)


def results_table(results: Sequence[EvaluationResult]) -> str:
    """A markdown table, one row per model, mean ± std per metric, then the protocol in one line."""
    keys = [c for c in _COLUMNS if any(c[0] in r.metrics for r in results)]
    header = "| model | " + " | ".join(h for _, h, _ in keys) + " | images | skipped |"
    rule = "|---|" + "---:|" * (len(keys) + 2)
    rows = [
        f"| {r.model} | " + " | ".join(r.metrics[k].format(d) if k in r.metrics else "–" for k, _, d in keys)
        + f" | {r.count} | {r.skipped} |"
        for r in results
    ]
    lines = [header, rule, *rows, "", _protocol_line(results[0].settings) if results else ""]
    lines += [f"Skipped by {r.model}: " + ", ".join(f"{n} {reason}" for reason, n in sorted(r.skip_reasons.items()))
              for r in results if r.skip_reasons]
    return "\n".join(lines).rstrip() + "\n"


def _protocol_line(settings: dict) -> str:
    return (
        f"Protocol {settings.get('protocol', 'klvae')}: {settings.get('preprocessing', 'resize shorter side (bicubic) + center crop')} "
        f"to {settings['resolution']} px; posterior {settings['posterior']}; uint8 quantization round((x+1)*127.5); "
        f"PSNR per image (peak 255) then mean; SSIM Gaussian {SSIM_KERNEL_SIZE}/σ {SSIM_SIGMA}, data_range 255; "
        f"LPIPS {settings.get('lpips_net', '-')}; rFID: {settings.get('fid_network', '-')}."
    )


def write_report(results: Sequence[EvaluationResult], output_dir: str | os.PathLike, grid: Image.Image | None = None) -> dict[str, Path]:
    """Write ``metrics.json``, ``metrics.md``, ``per_image.csv`` and ``grid.png`` (when given) into ``output_dir``.
    A full disk raises ``cli_support.DiskFull`` naming the file."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "metrics.json", "markdown": out / "metrics.md", "csv": out / "per_image.csv"}
    table = results_table(results)
    if grid is not None:
        files["grid"] = out / "grid.png"
        table += f"\nGrid ({files['grid'].name}): one row per image: original | " + " | ".join(r.model for r in results) \
                 + " | amplified error of each, same order.\n"
    writers = {
        "json": lambda path: path.write_text(json.dumps({"results": [r.to_dict() for r in results]}, indent=2) + "\n"),
        "markdown": lambda path: path.write_text(table),
        "csv": lambda path: _write_csv(results, path),
        "grid": lambda path: grid.save(path),
    }
    for key, path in files.items():
        with writing(path):
            writers[key](path)
    return files


def _write_csv(results: Sequence[EvaluationResult], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in results for k in r.per_image))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "image", *keys])
        for r in results:
            for i, image in enumerate(r.image_names):
                writer.writerow([r.model, image, *(_csv_value(r.per_image.get(k), i) for k in keys)])


def _csv_value(values, i: int) -> str:
    if values is None:
        return ""
    return repr(float(values[i])) if math.isfinite(values[i]) else str(values[i])
