"""The files ``klvae-eval`` writes from its results (``eval_results``): the markdown table, JSON, CSV, grid.
``evaluation`` re-exports the public names."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Sequence

from PIL import Image

from .cli_support import writing
from .eval_results import EvaluationResult, ProtocolRecord, results_to_dict
from .metrics import SSIM_KERNEL_SIZE, SSIM_SIGMA

logger = logging.getLogger(__name__)

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
    lines = [header, rule, *rows, "", _protocol_line(results[0].protocol) if results else ""]
    lines += [f"Skipped by {r.model}: " + ", ".join(f"{n} {reason}" for reason, n in sorted(r.skip_reasons.items()))
              for r in results if r.skip_reasons]
    return "\n".join(lines).rstrip() + "\n"


def _protocol_line(protocol: ProtocolRecord) -> str:
    return (
        f"Protocol {protocol.name}: {protocol.preprocessing} to {protocol.resolution} px; posterior {protocol.posterior}; "
        f"uint8 quantization round((x+1)*127.5); PSNR per image (peak 255) then mean; SSIM Gaussian "
        f"{SSIM_KERNEL_SIZE}/σ {SSIM_SIGMA}, data_range 255; LPIPS {protocol.lpips_net or '-'}; "
        f"rFID: {protocol.fid_network or '-'}."
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
    elif (out / "grid.png").is_file():  # an earlier run's grid would sit beside these numbers as if it showed them
        (out / "grid.png").unlink()
        logger.info("removed the earlier run's %s", out / "grid.png")
    # file names that are not UTF-8 (os.listdir's surrogate escapes) are written with backslash escapes
    writers = {
        "json": lambda path: path.write_text(json.dumps(results_to_dict(results), indent=2) + "\n"),
        "markdown": lambda path: path.write_text(table, encoding="utf-8", errors="backslashreplace"),
        "csv": lambda path: _write_csv(results, path),
        "grid": lambda path: grid.save(path),
    }
    for key, path in files.items():
        with writing(path):
            writers[key](path)
    return files


def _write_csv(results: Sequence[EvaluationResult], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in results for k in r.per_image))
    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "image", *keys])
        for r in results:
            for i, image in enumerate(r.image_names):
                writer.writerow([r.model, image, *("" if k not in r.per_image else repr(float(r.per_image[k][i]))
                                                     for k in keys)])
