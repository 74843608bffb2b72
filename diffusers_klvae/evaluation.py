"""``klvae-eval``: reconstruct images with one or more VAEs and score them (PSNR, SSIM, LPIPS, rFID, masked PSNR)
under a named protocol, written into every result; the protocols' steps are in docs/evaluation.md#protocols.

The metrics live in ``metrics``, the sources and protocols in ``eval_data``, the results in ``eval_results``, the
files in ``eval_report``, the model loader in ``loading``. The ones a user needs (``evaluate``, ``compare``,
``reconstruct``, ``load_vae``, the result dataclasses, ``PROTOCOLS``, ``ImageSource``) are importable from here::

    from diffusers_klvae.evaluation import evaluate
    result = evaluate("stabilityai/sd-vae-ft-mse", "path/to/images", resolution=256)
    print(result.to_markdown())
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from . import __version__
from .cli_support import OneLineParser, check_finite, int_at_least, run_command
from .eval_data import (  # noqa: F401 - PROTOCOLS, ImageSource: public names
    PROTOCOLS, ImageSource, add_source_args, autocast_dtype, check_output_outside_data, get_protocol, iter_batches,
    model_name, resolve_device,
)
from .eval_report import results_table, write_report  # noqa: F401 - public names
from .eval_results import DataSource, EvaluationResult, MetricSummary, ProtocolRecord  # noqa: F401 - public names
from .fid import load_fid_inception
from .imaging import reconstruction_grid, to_uint8
from .loading import load_vae
from .latent_masks import downsampling_factor, masked_reconstruct, random_pixel_mask
from .metrics import (  # noqa: F401 - public names of this module since before the split
    PER_IMAGE_KEYS, SSIM_KERNEL_SIZE, SSIM_SIGMA, lpips_distance, make_fid_metric, psnr, region_psnr, rfid, ssim,
)
from .perceptual import load_lpips

logger = logging.getLogger(__name__)

DEFAULT_METRICS = ("psnr", "ssim", "lpips", "rfid")
METRICS = DEFAULT_METRICS + ("masked_psnr",)
GRID_IMAGES = 4  # images shown in the comparison grid written by `klvae-eval --output`


@torch.no_grad()
def reconstruct(vae: nn.Module, images: torch.Tensor, *, sample_posterior: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> reconstructions (B, 3, H, W), float32, not clamped.

    Uses the posterior's ``mode()``, the evaluation protocol; ``sample_posterior=True`` draws from it with ``generator``.
    """
    weight = next(vae.parameters())
    posterior = vae.encode(images.to(device=weight.device, dtype=weight.dtype)).latent_dist
    z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
    return vae.decode(z).sample.float()


class _Meters:
    """Per-image values, the FID accumulator and stage timings of one evaluation pass."""

    def __init__(self, metrics: Sequence[str], *, lpips_model, fid_extractor, device: torch.device):
        self.metrics, self.lpips_model, self.device = metrics, lpips_model, device
        self.fid_metric = make_fid_metric(fid_extractor).to(device) if fid_extractor is not None else None
        self.values = {key: [] for m in metrics for key in PER_IMAGE_KEYS[m]}
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, stage: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # GPU work is asynchronous: time it to completion
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def update(self, x8: torch.Tensor, rec8: torch.Tensor) -> None:
        """Per-image metrics and FID features of one batch of uint8 originals / reconstructions."""
        per_image = {"psnr": psnr, "ssim": ssim, "lpips": lambda x, y: lpips_distance(x, y, self.lpips_model)}
        for metric in (m for m in self.metrics if m in per_image):
            with self.timed(metric):
                self.values[metric] += per_image[metric](x8, rec8).tolist()
        if "rfid" in self.metrics:
            with self.timed("rfid"):
                self.fid_metric.update(x8, real=True)
                self.fid_metric.update(rec8, real=False)

    def update_masked(self, vae, x: torch.Tensor, generator: torch.Generator) -> None:
        with self.timed("masked_psnr"):
            mask = random_pixel_mask(x.shape[0], *x.shape[-2:], "boxes", generator, grid=downsampling_factor(vae))
            decoded, target, region = masked_reconstruct(vae, x, mask)
            dec8, target8 = to_uint8(decoded), to_uint8(target)
            self.values["masked_psnr_kept"] += region_psnr(dec8, target8, region).tolist()
            self.values["masked_psnr_hole"] += region_psnr(dec8, target8, 1.0 - region).tolist()

    def summaries(self) -> dict[str, MetricSummary]:
        summaries = {key: MetricSummary.of(values) for key, values in self.values.items()}
        if "rfid" in self.metrics:
            count = int(self.fid_metric.real_features_num_samples)
            if count < 2:
                logger.warning("rFID needs at least 2 images, got %d: not computed", count)
            with self.timed("rfid"):
                summaries["rfid"] = MetricSummary(float(self.fid_metric.compute()) if count >= 2 else float("nan"), None, count)
        return summaries


def evaluate(
    vae_or_path,
    data,
    *,
    resolution: int = 256,
    batch_size: int = 8,
    metrics: Sequence[str] = DEFAULT_METRICS,
    max_images: int | None = None,
    sample_posterior: bool | None = None,
    protocol: str = "klvae",
    lpips_net: str = "vgg",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    split: str = "validation",
    image_column: str | None = None,
    lpips_model: nn.Module | None = None,
    fid_extractor: nn.Module | None = None,
    keep_images: int = 0,
    name: str | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Measure a VAE's reconstructions with a named protocol (docs/evaluation.md#protocols).

    Args:
        vae_or_path: a VAE module or a spec for ``loading.load_vae`` (folder, single file, preset, Hub id).
        data: image folder, list of PIL images or paths, HF dataset name (streamed) or ``datasets`` object.
        resolution (`int`, *optional*, defaults to 256): side of the center crop, after resizing the shorter side.
        batch_size (`int`, *optional*, defaults to 8): images per model call.
        metrics (`Sequence[str]`, *optional*, defaults to ``("psnr", "ssim", "lpips", "rfid")``): also ``"masked_psnr"``.
        max_images (`int`, *optional*): stop after this many readable images (all when `None`).
        sample_posterior (`bool`, *optional*): decode a seeded posterior sample instead of the mode; `None` takes the
            protocol's choice (``"klvae"``: the mode, ``"lightningdit"``: a sample).
        protocol (`str`, *optional*, defaults to `"klvae"`): ``"klvae"`` or ``"lightningdit"`` (``eval_data.PROTOCOLS``):
            the preprocessing and the default posterior; recorded in ``result.protocol`` (a ``ProtocolRecord``).
        lpips_net (`str`, *optional*, defaults to `"vgg"`): LPIPS backbone, `"vgg"` or `"alex"`.
        device (*optional*): where to run; the model's device for a module, else CUDA when available, else CPU.
        dtype (*optional*): `"float16"`/`"bfloat16"` (or a torch dtype) runs the VAE under autocast; metrics stay float32.
        seed (`int`, *optional*, defaults to 0): seeds posterior samples and the masked-PSNR masks (same for every model).
        split, image_column: for HF datasets (defaults: `"validation"`, auto-detected column).
        lpips_model (*optional*): a ready LPIPS module (default: ``perceptual.load_lpips(lpips_net)``, real weights).
        fid_extractor (*optional*): uint8 -> features module (default: ``fid.load_fid_inception()``, real weights).
        keep_images (`int`, *optional*, defaults to 0): keep the first N originals/reconstructions in ``result.samples``.
        name (`str`, *optional*): the model's name in tables (default: the spec, or the class name).
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.

    Returns:
        :class:`EvaluationResult`.
    """
    metrics = _check_metrics(metrics)
    chosen = get_protocol(protocol)
    sample_posterior = chosen.sample_posterior if sample_posterior is None else sample_posterior
    vae = load_vae(vae_or_path)
    device = resolve_device(device, vae_or_path)
    amp_dtype = autocast_dtype(dtype)
    lpips_model, fid_extractor = _metric_networks(metrics, lpips_net, lpips_model, fid_extractor, device)
    meters = _Meters(metrics, lpips_model=lpips_model, fid_extractor=fid_extractor, device=device)
    source = ImageSource(data, split=split, image_column=image_column)
    batches = iter_batches(source, resolution=resolution, batch_size=batch_size, max_images=max_images, protocol=protocol)
    names, kept = [], ([], [])
    generator = torch.Generator(device).manual_seed(seed)
    mask_generator = torch.Generator().manual_seed(seed)  # masks are drawn on the CPU
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    was_training = vae.training
    vae.to(device).eval()
    try:
        with torch.inference_mode():
            for batch_names, x in _progress(batches, meters, progress):
                x = x.to(device)
                with meters.timed("reconstruct"), autocast():
                    x_rec = reconstruct(vae, x, sample_posterior=sample_posterior, generator=generator)
                check_finite(x_rec, f"the reconstructions of {name or model_name(vae_or_path)}")  # not scored as black
                meters.update(to_uint8(x), to_uint8(x_rec))  # metrics outside autocast: float32 (float64 for FID sums)
                if "masked_psnr" in metrics:
                    with autocast():
                        meters.update_masked(vae, x, mask_generator)
                room = keep_images - len(names)
                if room > 0:  # the first keep_images originals and reconstructions, for grids
                    kept[0].append(x[:room].cpu())
                    kept[1].append(x_rec[:room].clamp(-1, 1).cpu())
                names += batch_names
    finally:
        vae.train(was_training)  # a model evaluated during training goes back to training mode
    if not names:
        raise ValueError(f"no readable image in {source.describe()} ({source.skipped} skipped)")
    # what makes these numbers comparable with others (docs/evaluation.md#protocols, steps 1-8)
    record = ProtocolRecord(
        name=chosen.name, resolution=resolution, preprocessing=chosen.preprocessing,
        posterior=f"sample (seed {seed})" if sample_posterior else "mode",
        quantization="uint8: round((x + 1) * 127.5), clamped to [0, 255]",
        psnr="per image over CxHxW, peak 255, then mean over images",
        ssim=f"torchmetrics, gaussian kernel {SSIM_KERNEL_SIZE}, sigma {SSIM_SIGMA}, data_range 255",
        lpips_net=lpips_net if lpips_model is not None else None,
        lpips_weights=getattr(lpips_model, "weights_source", type(lpips_model).__name__) if lpips_model is not None else None,
        fid_network=getattr(fid_extractor, "source", type(fid_extractor).__name__) if fid_extractor is not None else None,
        fid_features=getattr(fid_extractor, "num_features", None) if fid_extractor is not None else None,
        masked_psnr=f"random boxes on the latent grid (seed {seed}), latent holes = 0, pixel holes mid-gray"
        if "masked_psnr" in metrics else None,
    )
    samples = (torch.cat(kept[0]), torch.cat(kept[1])) if kept[0] else None
    settings = {"metrics": list(metrics), "batch_size": batch_size, "max_images": max_images, "device": str(device),
                "autocast_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32 (no autocast)",
                "diffusers_klvae": __version__, "torch": torch.__version__}
    return EvaluationResult(
        model=name or model_name(vae_or_path), metrics=meters.summaries(), count=len(names), protocol=record,
        data_source=source.data_source(), skipped=source.skipped, settings=settings,
        per_image=meters.values, image_names=names, skipped_names=source.skipped_names,
        skip_reasons=dict(source.skip_reasons), timings=dict(meters.timings), samples=samples,
    )


def _progress(batches, meters: _Meters, enabled: bool):
    from tqdm.auto import tqdm

    with tqdm(desc="evaluate", unit="img", disable=not enabled) as bar:
        while True:
            with meters.timed("load"):  # decode + resize + crop of the next batch
                item = next(batches, None)
            if item is None:
                return
            yield item
            bar.update(len(item[0]))


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    metrics = tuple(dict.fromkeys([metrics] if isinstance(metrics, str) else metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {list(metrics)}")
    return metrics


def _metric_networks(metrics, lpips_net, lpips_model, fid_extractor, device):
    if lpips_model is not None or "lpips" in metrics:
        lpips_model = load_lpips(lpips_net, device=device) if lpips_model is None else lpips_model
        lpips_model = lpips_model.to(device).eval()
    if "rfid" in metrics and fid_extractor is None:
        fid_extractor = load_fid_inception(device=device)
    return (lpips_model if "lpips" in metrics else None), (fid_extractor if "rfid" in metrics else None)


# --- comparison of several models, command line ---


def compare(models: Sequence, data, *, grid_images: int = GRID_IMAGES, lpips_net: str = "vgg", device=None,
            metrics: Sequence[str] = DEFAULT_METRICS, lpips_model=None, fid_extractor=None, **kwargs) -> tuple[list[EvaluationResult], Image.Image | None]:
    """Evaluate each model on the same images; returns the results and a grid (original | each model | each error).

    The LPIPS and Inception networks are loaded once and shared. ``kwargs`` go to :func:`evaluate`.
    """
    if not models:
        raise ValueError("give at least one model")
    metrics = _check_metrics(metrics)
    device = resolve_device(device)
    lpips_model, fid_extractor = _metric_networks(metrics, lpips_net, lpips_model, fid_extractor, device)
    results = [evaluate(spec, data, metrics=metrics, lpips_net=lpips_net, device=device, lpips_model=lpips_model,
                        fid_extractor=fid_extractor, keep_images=grid_images, name=model_name(spec), **kwargs)
               for spec in models]  # each evaluate loads its model and drops it: one model in memory at a time
    samples = [r.samples for r in results if r.samples is not None]
    grid = reconstruction_grid(samples[0][0], [s[1] for s in samples]) if samples else None  # all or none kept images
    return results, grid


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="klvae-eval",
        description="Evaluate VAEs (PSNR, SSIM, LPIPS, rFID) under a named protocol and compare them on the same images.",
    )
    parser.add_argument("--model", action="append", required=True,
                        help="diffusers folder, single file, preset name or Hub id; repeat to compare models")
    add_source_args(parser)
    parser.add_argument("--output", default=None, help="folder for metrics.json, metrics.md, per_image.csv, grid.png")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="klvae",
                        help="klvae (PIL bicubic resize + center crop, posterior mode; default) or lightningdit "
                             "(LightningDiT's evaluate_tokenizer.py: tensor bilinear antialiased resize + center crop, "
                             "seeded posterior sample)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help=f"comma-separated subset of {','.join(METRICS)}")
    parser.add_argument("--lpips-net", choices=("vgg", "alex"), default="vgg")
    parser.add_argument("--sample-posterior", action="store_true", default=None,
                        help="decode a seeded posterior sample instead of the mode (the lightningdit protocol always does)")
    parser.add_argument("--grid-images", type=int_at_least(0), default=GRID_IMAGES, help="images in grid.png (0: no grid)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``klvae-eval``: the table on stdout; a user error is one line on stderr and exit status 2."""
    return run_command(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> None:
    if args.output:
        check_output_outside_data(args.output, args.data)  # before the long computation
    results, grid = compare(
        args.model, args.data, grid_images=args.grid_images if args.output else 0, lpips_net=args.lpips_net,
        device=args.device, metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
        resolution=args.resolution, batch_size=args.batch_size, max_images=args.max_images, protocol=args.protocol,
        sample_posterior=args.sample_posterior, dtype=args.dtype, seed=args.seed, split=args.split,
        image_column=args.image_column,
    )
    sys.stdout.write(results_table(results))  # the command's product: a table on stdout, pipeable
    if args.output:
        files = write_report(results, args.output, grid)
        logger.info("wrote %s", ", ".join(os.fspath(p) for p in files.values()))


if __name__ == "__main__":
    sys.exit(main())
