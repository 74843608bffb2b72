"""The model card of a published VAE (YAML metadata + architecture, usage, training, evaluation, reconstructions and
limitations), rendered from ``model_cards/klvae_template.md`` with ``huggingface_hub.ModelCard``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml  # a dependency of huggingface_hub
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .eval_results import EvaluationResult, MetricSummary, load_metrics
from .models.config import downsampling_factor_of
from .models.single_file import single_file_mismatches
from .publish_checks import flatten, is_local_path, plain, read_json, sanitize_training_args

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent / "model_cards" / "klvae_template.md"
DEFAULT_LICENSE = "openrail++"  # the license of the SD 2.x / SDXL weights; users pass their own
# The Hub has no "autoencoder" task; a VAE maps an image to an image (through its latent), and "image-to-image" is
# the accepted task id that says so. stabilityai/sd-vae-ft-mse and sdxl-vae set none, so no task filter finds them.
PIPELINE_TAG = "image-to-image"
TAGS = ("vae", "autoencoder", "stable-diffusion", "stable-diffusion-diffusers", "diffusers-klvae")
CARD_METRICS = {"psnr": ("PSNR", "{:.2f}"), "ssim": ("SSIM", "{:.3f}"), "lpips": ("LPIPS", "{:.3f}"),
                "rfid": ("rFID", "{:.2f}")}  # result key -> (pretty name, format); other metrics stay out of the card

# Training-table rows: label -> the arguments that may hold it (train_autoencoder.py's names, which diffusers'
# autoencoderkl example shares, and a free-form "hardware"), matched on the last component of a dotted key.
_TRAINING_FIELDS = (
    ("Data", ("dataset_name", "train_data_dir")),
    ("Resolution", ("resolution",)),
    ("Steps", ("max_train_steps",)),
    ("Batch size per device", ("train_batch_size",)),
    ("Gradient accumulation", ("gradient_accumulation_steps",)),
    ("Learning rate", ("learning_rate",)),
    ("LR schedule", ("lr_scheduler",)),
    ("Reconstruction loss", ("rec_loss",)),
    ("Discriminator starts at step", ("disc_start",)),
    ("EMA decay", ("ema_decay",)),
    ("Mixed precision", ("mixed_precision",)),
    ("Hardware", ("hardware",)),
    ("Initialized from", ("pretrained_model_name_or_path", "preset")),
    ("Decoder only (encoder frozen)", ("decoder_only",)),
    ("LPIPS network", ("lpips_net",)),
    ("Discriminator loss", ("disc_loss",)),
)


# ----------------------------------------------------------------------------------------------- training
def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def training_rows(args: Mapping, withheld: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Sanitized training arguments -> (label, value) rows for the card: data, steps, batch, losses, hardware.

    ``withheld``: argument names whose values sanitizing removed; a withheld data path still gets a "Data" row
    saying that the data was local, without the path.
    """
    flat = flatten(args)
    withheld = {name.rsplit(".", 1)[-1] for name in withheld}
    by_leaf = {key.rsplit(".", 1)[-1]: value for key, value in reversed(flat.items())}  # the first of a name wins
    rows = []
    for label, names in _TRAINING_FIELDS:
        value = next((by_leaf[n] for n in names if by_leaf.get(n) not in (None, "", [])), None)
        if value is not None:
            rows.append((label, _format_value(value)))
        elif label == "Data" and withheld & set(names):
            rows.append((label, "local files (path not published)"))
        if label == "Reconstruction loss":  # loss weights sit right after the loss they scale
            weights = {k.rsplit(".", 1)[-1]: v for k, v in flat.items() if k.endswith("_weight") and v is not None}
            if weights:
                rows.append(("Loss weights", ", ".join(f"{k} = {_format_value(v)}" for k, v in weights.items())))
    return rows


# ----------------------------------------------------------------------------------------------- evaluation
def card_results(metrics: Any) -> list[EvaluationResult]:
    """Results that have a PSNR/SSIM/LPIPS/rFID value, from anything ``load_metrics`` reads; ``[]`` for `None`."""
    if metrics is None:
        return []
    results = [r for r in load_metrics(metrics) if _card_metrics(r)]
    if not results:
        raise ValueError("the metrics hold no PSNR/SSIM/LPIPS/rFID value to show")
    return results


def _card_metrics(result: EvaluationResult) -> dict[str, MetricSummary]:
    return {k: m for k, m in result.metrics.items() if k in CARD_METRICS and m.count and not math.isnan(m.mean)}


def _public_name(name: str) -> str:
    """Models may be named by a local path (``klvae-eval --model outputs/run``): keep only its last component."""
    return (Path(name.rstrip("/\\")).name or name) if is_local_path(name) else name


def _looks_local(name: str) -> bool:
    return is_local_path(name) or name.startswith(".") or Path(name).exists()


def same_path(name: str, path: str | os.PathLike) -> bool:
    return bool(name) and _looks_local(name) and Path(name).expanduser().resolve() == Path(path).resolve()


def pick_result(results: list[EvaluationResult], name: str | os.PathLike | None) -> EvaluationResult:
    """The result of the published model: the one named ``name`` (or the same local path); without a name, the only
    one, else the only one evaluated from a local path (baselines are Hub ids), else the first."""
    if name is not None:
        for result in results:
            if str(name) in (result.model, _public_name(result.model)) or same_path(result.model, name):
                return result
        found = [_public_name(r.model) for r in results]
        raise ValueError(f"no evaluated model named {os.fspath(name)!r} in the metrics; found {found}")
    local = [r for r in results if _looks_local(r.model)]
    if len(local) == 1:
        return local[0]
    if len(results) > 1:
        logger.warning("metrics hold %d models; taking %r as this model (pass metrics_model= to choose)",
                       len(results), _public_name(results[0].model))
    return results[0]


def eval_results(result: EvaluationResult) -> list:
    """One result -> `huggingface_hub.EvalResult` list for the card's model-index."""
    dataset = result.data_source.public_name() or "custom"  # model-index requires a dataset id
    resolution = result.protocol.resolution
    return [
        EvalResult(task_type=PIPELINE_TAG, task_name="Image reconstruction", dataset_type=dataset,
                   dataset_name=f"{dataset} ({resolution}x{resolution})", dataset_split=result.data_source.split,
                   dataset_args={"resolution": resolution, "num_images": result.count}, metric_type=key,
                   metric_name=CARD_METRICS[key][0], metric_value=round(summary.mean, 4))
        for key, summary in _card_metrics(result).items()
        if math.isfinite(summary.mean)  # the Hub's metadata holds numbers; an infinite PSNR stays in the table only
    ]


def _format_metric(key: str, summary: MetricSummary | None) -> str:
    if summary is None:
        return "–"
    fmt = CARD_METRICS[key][1]
    return fmt.format(summary.mean) + (f" ± {fmt.format(summary.std)}" if summary.std is not None else "")


def _eval_protocol(result: EvaluationResult) -> str:
    source, protocol = result.data_source, result.protocol
    dataset = source.public_name()
    dataset = f"{dataset} ({source.split})" if dataset and source.split else dataset
    dataset = f"{dataset} images" if dataset else "images of an unrecorded dataset"
    published = flatten(sanitize_training_args({**protocol.to_dict(), **result.settings}))  # no secret, no local path
    settings = ", ".join(f"`{k}={_format_value(v)}`" for k, v in published.items() if v is not None)
    return (
        f"Protocol `{protocol.name}`: reconstructions of {result.count} {dataset} at "
        f"{protocol.resolution}x{protocol.resolution}; mean ± std over images (rFID is one value over the whole set). "
        f"PSNR/SSIM on images quantized to uint8 as saved; LPIPS: lower is closer. Settings: {settings}."
    )


# ----------------------------------------------------------------------------------------------- architecture
def architecture_rows(vae) -> list[tuple[str, str]]:
    """(label, value) rows describing the autoencoder, read from its config and parameters."""
    config = dict(vae.config)
    channels = list(config["block_out_channels"])
    factor = downsampling_factor_of(config)
    latent = config["latent_channels"]
    n_params = sum(p.numel() for p in vae.parameters())
    n_enc = sum(p.numel() for p in vae.encoder.parameters())
    n_dec = sum(p.numel() for p in vae.decoder.parameters())
    rows = [
        ("Class", f"`{model_class(vae)}`"),
        ("block_out_channels", _format_value(channels)),
        ("layers_per_block", str(config["layers_per_block"])),
        ("latent_channels", str(latent)),
        ("Downsampling factor", f"{factor} (f{factor})"),
        ("Latent shape at 256²", f"{latent}×{256 // factor}×{256 // factor}"),
        ("Latent shape at 512²", f"{latent}×{512 // factor}×{512 // factor}"),
        ("scaling_factor", _format_value(config.get("scaling_factor"))),
        ("shift_factor", "none" if config.get("shift_factor") is None else _format_value(config["shift_factor"])),
    ]
    if config.get("latents_mean") is not None:
        rows.append(("latents_mean / latents_std", "per-channel, in config.json"))
    rows.append(("Parameters", f"{n_params / 1e6:.2f} M (encoder {n_enc / 1e6:.2f} M, decoder {n_dec / 1e6:.2f} M)"))
    return rows


def model_class(vae) -> str:
    """The class its saved config.json names: default architectures save as plain ``AutoencoderKL``, extended ones
    (e.g. squeeze-excitation) need KLVAE."""
    name = json.loads(vae.to_json_string()).get("_class_name", "AutoencoderKL")
    return "AutoencoderKL" if name == "AutoencoderKL" else "KLVAE"


def single_file_tools(config: Mapping) -> str | None:
    """The tools that decode this architecture's original-layout file correctly, for the card; `None` when none do
    (then no single file is staged): ComfyUI and AUTOMATIC1111 build the SD KL-f8 VAE, ComfyUI also its 16-channel
    variant without quant convs."""
    if single_file_mismatches(config):
        return None
    return "ComfyUI" if config["latent_channels"] == 16 else "ComfyUI and AUTOMATIC1111"


def _usage_pipeline(config: Mapping) -> tuple[str, str]:
    """Which diffusers pipeline shares this latent layout, for the usage snippet."""
    if config["latent_channels"] == 4 and abs(config.get("scaling_factor", 0) - 0.13025) < 1e-6:
        return "StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0"
    if config["latent_channels"] == 4:
        return "StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5"
    return "DiffusionPipeline", "your-name/your-latent-diffusion-model"


def _limitations(config: Mapping, base_model: str | None, pipeline_base: str, has_metrics: bool) -> list[str]:
    """Honest caveats for the card, chosen from the config and what was recorded."""
    factor = downsampling_factor_of(config)
    if base_model:
        items = [f"Fine-tuned from `{base_model}`: it drops into pipelines built on that VAE only as far as its "
                 "latent space stayed the same (a frozen encoder keeps it exactly); compare generations before "
                 "swapping it in."]
    else:
        items = ["Trained from scratch, so its latent space is its own: a diffusion model trained on another VAE's "
                 f"latents (such as `{pipeline_base}`) will not decode correctly with it; train or fine-tune the "
                 "diffusion model on these latents."]
    if config["latent_channels"] != 4:
        items.append(f"{config['latent_channels']} latent channels: not a drop-in for SD 1.x/2.x/SDXL (4 channels).")
    items.append(f"Like every KL-f{factor} autoencoder it loses high-frequency detail: small text, small faces and "
                 "dense textures are reconstructed approximately.")
    if has_metrics:
        items.append("The metrics above come from the evaluation set named there; other image domains can score "
                     "very differently.")
    if config.get("force_upcast"):
        items.append("`force_upcast` is set, so fp16 pipelines decode with this VAE in fp32 (slower, but KL-f8 VAEs "
                     "can overflow in fp16).")
    else:
        items.append("`force_upcast` is off: the VAE runs in the pipeline's dtype; check fp16 outputs for NaNs.")
    return items


# ----------------------------------------------------------------------------------------------- the card
def render_model_card(vae, *, repo_id: str, metrics: Any = None, metrics_model: str | None = None,
                      images: Sequence[str | os.PathLike] = (), training_args: Any = None,
                      base_model: str | None = None, datasets: str | Sequence[str] | None = None,
                      license: str = DEFAULT_LICENSE, single_file_name: str | None = None, has_ema: bool = False,
                      template_path: str | os.PathLike = TEMPLATE_PATH):
    """Build the model card (`huggingface_hub.ModelCard`) for a VAE.

    Args:
        vae (`KLVAE` or `AutoencoderKL`): the model; architecture and parameter counts are read from it.
        repo_id (`str`): ``"user/name"``; used in the usage snippet and as the model-index name.
        metrics (*optional*, defaults to `None`): an `EvaluationResult`, a list of them, or ``klvae-eval``'s
            ``metrics.json`` (a path or its content), see ``eval_results.load_metrics``.
        metrics_model (`str`, *optional*, defaults to `None`): name (or local path) of this model's result; `None`
            takes the only one, else the only one evaluated from a local path (baselines are Hub ids), else the
            first. Every result appears in the card's table; only this one goes into the model-index.
        images (sequence of paths, *optional*, defaults to `()`): image paths *relative to the staged folder*; names
            containing "loss" are shown under Training, the others under Reconstructions.
        training_args (`dict`/Namespace/dataclass/path, *optional*, defaults to `None`): sanitized with
            `sanitize_training_args` before anything is rendered.
        base_model (`str`, *optional*, defaults to `None`): Hub id of the VAE this one was fine-tuned from.
        datasets (`str` or list, *optional*, defaults to `None`): Hub ids of the training datasets.
        license (`str`, *optional*, defaults to ``"openrail++"``): a Hub license id.
        single_file_name (`str`, *optional*, defaults to `None`): the original-layout file in the repo, if any.
        has_ema (`bool`, *optional*, defaults to `False`): whether the repo holds the ``ema`` weights variant.
        template_path (path, *optional*): the Jinja template; defaults to the packaged ``klvae_template.md``.

    Returns:
        `huggingface_hub.ModelCard`
    """
    config = dict(vae.config)
    results = card_results(metrics)
    ours = pick_result(results, metrics_model) if results else None
    if isinstance(training_args, (str, os.PathLike)):
        training_args = read_json(Path(training_args), what="training arguments")
    args = sanitize_training_args(training_args)
    withheld = set(flatten(plain(training_args or {}))) - set(flatten(args))
    datasets = [datasets] if isinstance(datasets, str) else datasets
    datasets = [_public_name(os.fspath(d)) for d in datasets or ()] or None  # a local path: its last component
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        library_name="diffusers", pipeline_tag=PIPELINE_TAG, tags=list(TAGS), license=license,
        base_model=base_model, datasets=datasets, model_name=model_name,
        eval_results=eval_results(ours) if ours else None,
    )
    evaluation = [
        {"name": f"{model_name} (this model)" if result is ours else _public_name(result.model), "count": result.count,
         **{key: _format_metric(key, _card_metrics(result).get(key)) for key in CARD_METRICS}}
        for result in results
    ]
    pipeline_class, pipeline_base = _usage_pipeline(config)
    cls = model_class(vae)  # the class name the saved config.json will carry
    import_line = (f"from diffusers import AutoencoderKL, {pipeline_class}" if cls == "AutoencoderKL" else
                   f"from diffusers import {pipeline_class}\nfrom diffusers_klvae import KLVAE")
    recon_images, loss_images = [], []  # names holding "loss" are shown under Training
    for path in map(Path, images):
        entry = {"path": path.as_posix(), "caption": path.stem.replace("_", " ").replace("-", " ")}
        (loss_images if "loss" in path.stem.lower() else recon_images).append(entry)
    args_yaml = yaml.safe_dump(args, sort_keys=False, allow_unicode=True).strip() if args else ""
    card = ModelCard.from_template(
        card_data, template_path=os.fspath(template_path), model_name=model_name, repo_id=repo_id,
        factor=downsampling_factor_of(config), latent_channels=config["latent_channels"],
        shift_factor=config.get("shift_factor"), architecture=architecture_rows(vae), pipeline_class=pipeline_class,
        model_class=cls, import_line=import_line, pipeline_base=pipeline_base, single_file_name=single_file_name,
        single_file_tools=single_file_tools(config) if single_file_name else None, has_ema=has_ema,
        training=training_rows(args, withheld), training_args_yaml=args_yaml,
        evaluation=evaluation, eval_protocol=_eval_protocol(ours) if ours else "", images=recon_images,
        loss_images=loss_images, limitations=_limitations(config, base_model, pipeline_base, has_metrics=bool(results)),
    )
    card.text = re.sub(r"\n{3,}", "\n\n", card.text)  # optional sections leave runs of blank lines behind
    return card
