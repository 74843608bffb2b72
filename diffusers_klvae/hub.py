"""Publish a trained KL autoencoder on the Hugging Face Hub: stage a folder, write its model card, check it, upload it.

The staged folder is what every consumer expects from a VAE repo:

    config.json + diffusion_pytorch_model.safetensors   # AutoencoderKL.from_pretrained(repo) / pipelines' vae=
    diffusion_pytorch_model.ema.safetensors              # EMA weights, when given: from_pretrained(repo, variant="ema")
    <repo-name>.safetensors                              # original LDM layout for ComfyUI / AUTOMATIC1111, only
                                                         # for the SD/SDXL architecture they hardcode
    images/*.png                                         # reconstruction grid, loss curves
    README.md                                            # model card: YAML metadata (model-index) + sections

Nothing leaves the machine unless `publish` is called: it stages, validates (weights, config, card metadata, no
token / local path / secret in any text file) and only then makes one `create_repo` + one `upload_folder` commit.
The token comes from the caller or from huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``) and is
never written to disk. ``klvae-push MODEL_DIR --repo-id you/name --dry-run`` stages and lists without uploading.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CARD_NAME = "README.md"
# EMA weights ship as the "ema" variant beside the main weights, not in an ema/ subfolder: for a *local* folder,
# diffusers' from_pretrained(path, subfolder="ema") loads the root weights when the root has any (it checks the root
# first), so a downloaded snapshot would silently give the wrong model. The variant file name has no such ambiguity.
EMA_VARIANT = "ema"
EMA_WEIGHTS_NAME = f"diffusion_pytorch_model.{EMA_VARIANT}.safetensors"
IMAGES_SUBFOLDER = "images"
TEMPLATE_PATH = Path(__file__).resolve().parent / "model_cards" / "klvae_template.md"

DEFAULT_LICENSE = "openrail++"  # the license of the SD 2.x / SDXL weights; users pass their own
# The Hub has no "autoencoder" task; a VAE maps an image to an image (through its latent), and "image-to-image" is
# the accepted task id that says so. stabilityai/sd-vae-ft-mse and sdxl-vae set none, so no task filter finds them.
PIPELINE_TAG = "image-to-image"
TAGS = ("vae", "autoencoder", "stable-diffusion", "stable-diffusion-diffusers", "diffusers-klvae")
DEFAULT_COMMIT_MESSAGE = "Upload KL autoencoder with diffusers-klvae"

# Metric key as written by klvae-eval -> (pretty name, format). Aliases map other spellings onto these keys.
METRICS = {"psnr": ("PSNR", "{:.2f}"), "ssim": ("SSIM", "{:.3f}"), "lpips": ("LPIPS", "{:.3f}"),
           "rfid": ("rFID", "{:.2f}")}
_METRIC_ALIASES = {"fid": "rfid", "r_fid": "rfid", "r-fid": "rfid"}

_SECRET_WORDS = ("token", "secret", "password", "passwd", "api_key", "apikey", "credential")
_HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_WINDOWS_ABS_RE = re.compile(r"^[A-Za-z]:[\\/]")
_MIN_ENV_VALUE_LEN = 8  # shorter environment values ("1", "true", "fp16") are too common to mean anything
_TEXT_SUFFIXES = {".md", ".json", ".txt", ".yaml", ".yml"}

# Training-table rows: label -> argument names that may hold it (last component of a dotted key).
_TRAINING_FIELDS = (
    ("Data", ("dataset_name", "dataset", "train_data_dir", "data_dir", "data")),
    ("Resolution", ("resolution", "train_resolution", "image_size")),
    ("Steps", ("max_train_steps", "train_steps", "max_steps", "steps")),
    ("Batch size per device", ("train_batch_size", "batch_size")),
    ("Gradient accumulation", ("gradient_accumulation_steps", "grad_accum")),
    ("Learning rate", ("learning_rate", "lr")),
    ("LR schedule", ("lr_scheduler", "lr_schedule")),
    ("Reconstruction loss", ("rec_loss", "reconstruction_loss", "pixel_loss")),
    ("Discriminator starts at step", ("disc_start", "discriminator_start", "disc_start_step")),
    ("EMA decay", ("ema_decay",)),
    ("Mixed precision", ("mixed_precision",)),
    ("Hardware", ("hardware", "gpu", "device")),
    ("Processes", ("num_processes", "world_size")),
    ("Initialized from", ("pretrained_model_name_or_path", "init_from", "pretrained", "preset")),
    ("Decoder only (encoder frozen)", ("decoder_only", "train_decoder_only", "freeze_encoder")),
    ("LPIPS network", ("lpips_net",)),
    ("Discriminator loss", ("disc_loss",)),
)


# ----------------------------------------------------------------------------------------------- sanitizing


def _is_local_path(value: str) -> bool:
    return value.startswith(("/", "~", "file:")) or bool(_WINDOWS_ABS_RE.match(value))


def _leaks(value: str, env_values: Sequence[str]) -> bool:
    """True if a string is an absolute local path, looks like a Hub token, or contains an environment value."""
    return _is_local_path(value) or bool(_HF_TOKEN_RE.search(value)) or any(env in value for env in env_values)


def _plain(value: Any) -> Any:
    """Dataclass / Namespace / Path / dtype -> JSON-like Python values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, argparse.Namespace):
        return _plain(vars(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # Path, torch.dtype, enums


def sanitize_training_args(training_args: Any) -> dict:
    """Training arguments -> a dict safe to publish.

    Args:
        training_args (`dict`, `argparse.Namespace`, dataclass, or path to a JSON file):
            The arguments of the run. Nested mappings/dataclasses are kept nested.

    Returns:
        `dict`: the same arguments without any key containing token/secret/password/api_key/credential, and without
        any value that is an absolute local path, looks like a Hub token, or contains the value of an environment
        variable (at least 8 characters) of this process. Lists lose the offending items.
    """
    if training_args is None:
        return {}
    if isinstance(training_args, (str, os.PathLike)):
        training_args = _read_json(Path(training_args), what="training arguments")
    args = _plain(training_args)
    if not isinstance(args, dict):
        raise ValueError(f"training arguments must be a mapping, got {type(training_args).__name__}")
    env_values = [v for v in os.environ.values() if len(v) >= _MIN_ENV_VALUE_LEN]
    return _scrub(args, env_values)


_DROP = object()  # marks a value _scrub removes


def _scrub(value: Any, env_values: Sequence[str]) -> Any:
    """Recursive worker of `sanitize_training_args`; returns `_DROP` for values that must go."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if any(word in key.lower() for word in _SECRET_WORDS):
                continue
            item = _scrub(item, env_values)
            if item is not _DROP:
                out[key] = item
        return out
    if isinstance(value, list):
        return [item for item in (_scrub(v, env_values) for v in value) if item is not _DROP]
    if isinstance(value, str) and _leaks(value, env_values):
        return _DROP
    return value


def _flatten(args: Mapping, prefix: str = "") -> dict:
    """{"loss": {"kl_weight": 1e-6}} -> {"loss.kl_weight": 1e-6}"""
    flat = {}
    for key, value in args.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
    flat = _flatten(args)
    withheld = {name.rsplit(".", 1)[-1] for name in withheld}
    by_leaf: dict[str, Any] = {}
    for key, value in flat.items():
        by_leaf.setdefault(key.rsplit(".", 1)[-1], value)
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


# ----------------------------------------------------------------------------------------------- metrics


def _read_json(path: Path, *, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {os.fspath(path)!r} (expected a JSON file)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {os.fspath(path)!r} is not valid JSON: {err}") from err


def _number(value: Any) -> float | None:
    """A metric number: JSON numbers, and klvae-eval's "inf"/"-inf" strings (identical images give PSNR +inf)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "-inf"):
        return float(value)
    return None


def _metric_value(value: Any) -> tuple[float, float | None] | None:
    """24.5 | {"mean": 24.5, "std": 3.7} | {"value": 4.7} -> (mean, std or None); None when undefined."""
    if isinstance(value, Mapping):
        mean = _number(value.get("mean", value.get("value")))
        return None if mean is None else (mean, _number(value.get("std")))
    mean = _number(value)
    return None if mean is None else (mean, None)


def _public_name(name: Any, fallback: str | None) -> str | None:
    """Model and data names may be local paths (``klvae-eval --model outputs/run``): keep only what is safe to show."""
    if not name:
        return fallback
    name = str(name)
    return (Path(name.rstrip("/\\")).name or fallback) if _is_local_path(name) else name


def load_metrics(metrics: Any) -> list[dict]:
    """Evaluation results -> one row per evaluated model.

    Args:
        metrics (`dict`, path to a JSON file, or `None`):
            What ``klvae-eval --output`` writes (``metrics.json``: ``{"results": [{"model", "metrics": {"psnr":
            {"mean", "std", "count"}, ...}, "count", "settings": {...}}, ...]}``), the same list under ``"models"``
            (with ``"name"``), a single such entry (``EvaluationResult.to_dict()``), or a flat
            ``{"psnr": 24.5, "ssim": 0.71, ...}``.

    Returns:
        `list[dict]`: rows ``{"name" (safe to show, None if absent), "raw_name", "metrics": {key: (mean, std|None)},
        "count", "settings"}`` with keys among psnr/ssim/lpips/rfid (``fid`` is read as rFID); other metrics and
        undefined values are left out.
    """
    if metrics is None:
        return []
    if isinstance(metrics, (str, os.PathLike)):
        metrics = _read_json(Path(metrics), what="metrics")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a mapping or a JSON file of one, got {type(metrics).__name__}")
    top_settings = metrics.get("settings") if isinstance(metrics.get("settings"), Mapping) else {}
    entries = next((metrics[k] for k in ("results", "models") if isinstance(metrics.get(k), list)), None)
    if entries is None:
        entries = [metrics] if isinstance(metrics.get("metrics"), Mapping) else [{"metrics": metrics}]
    rows = []
    for entry in entries:
        values = {}
        for key, raw in dict(entry.get("metrics", {})).items():
            key = _METRIC_ALIASES.get(key.lower(), key.lower())
            parsed = _metric_value(raw)
            if key in METRICS and parsed is not None:
                values[key] = parsed
        if not values:
            continue
        settings = {**top_settings, **(entry.get("settings") or {})}
        raw_name = entry.get("model", entry.get("name"))
        count = entry.get("count", settings.get("count", settings.get("num_images", metrics.get("count"))))
        rows.append({"name": _public_name(raw_name, None), "raw_name": raw_name, "metrics": values, "count": count,
                     "settings": settings})
    if not rows:
        raise ValueError(
            "metrics hold no PSNR/SSIM/LPIPS/rFID values; expected klvae-eval's metrics.json "
            '({"results": [{"model": ..., "metrics": {"psnr": {"mean": ..., "std": ...}}}]}) or {"psnr": 24.5, ...}'
        )
    return rows


def _looks_local(name: Any) -> bool:
    name = str(name or "")
    return _is_local_path(name) or name.startswith(".") or Path(name).exists()


def _same_path(name: Any, path: str | os.PathLike) -> bool:
    return bool(name) and _looks_local(name) and Path(str(name)).expanduser().resolve() == Path(path).resolve()


def _pick(rows: list[dict], name: str | os.PathLike | None) -> dict:
    """The row of the published model: the one named ``name`` (or the same local path); without a name, the only
    row, else the only row evaluated from a local path (baselines are Hub ids), else the first."""
    if name is not None:
        for row in rows:
            if str(name) in (row["raw_name"], row["name"]) or _same_path(row["raw_name"], name):
                return row
        found = [r["name"] for r in rows]
        raise ValueError(f"no evaluated model named {os.fspath(name)!r} in the metrics; found {found}")
    local = [row for row in rows if _looks_local(row["raw_name"])]
    if len(rows) > 1 and len(local) != 1:
        logger.warning("metrics hold %d models; taking %r as this model (pass metrics_model= to choose)",
                       len(rows), rows[0]["name"])
    return local[0] if len(rows) > 1 and len(local) == 1 else rows[0]


_HF_DATASET_RE = re.compile(r"^hf-dataset (?P<name>\S+)(?: \(split (?P<split>[^)]+)\))?$")


def _eval_dataset(settings: Mapping) -> tuple[str | None, str | None, int | None]:
    """(dataset name or None, split or None, resolution or None) from the evaluation settings.

    klvae-eval records ``data`` as a folder path or ``"hf-dataset NAME (split SPLIT)"``; local paths keep only their
    last component.
    """
    data = next((settings[k] for k in ("dataset", "dataset_name", "data", "data_dir") if settings.get(k)), None)
    split = settings.get("split")
    match = _HF_DATASET_RE.match(str(data)) if data else None
    if match:
        data, split = match["name"], match["split"] or split
    resolution = settings.get("resolution")
    return _public_name(data, None), split, int(resolution) if isinstance(resolution, (int, float)) else None


def eval_results(row: dict) -> list:
    """One metrics row -> `huggingface_hub.EvalResult` list for the card's model-index."""
    from huggingface_hub import EvalResult

    dataset, split, resolution = _eval_dataset(row["settings"])
    dataset = dataset or "custom"  # model-index requires a dataset id
    label = f"{dataset} ({resolution}x{resolution})" if resolution else dataset
    args = {k: v for k, v in (("resolution", resolution), ("num_images", row["count"])) if v is not None}
    return [
        EvalResult(task_type=PIPELINE_TAG, task_name="Image reconstruction", dataset_type=dataset,
                   dataset_name=label, dataset_split=split, dataset_args=args or None, metric_type=key,
                   metric_name=METRICS[key][0], metric_value=round(mean, 4))
        for key, (mean, _std) in row["metrics"].items()
        if math.isfinite(mean)  # the Hub's metadata holds numbers; an infinite PSNR stays in the table only
    ]


def _format_metric(key: str, value: tuple[float, float | None] | None) -> str:
    if value is None:
        return "–"
    mean, std = value
    fmt = METRICS[key][1]
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else "")


def _eval_protocol(row: dict) -> str:
    dataset, split, resolution = _eval_dataset(row["settings"])
    dataset = f"{dataset} ({split})" if dataset and split else dataset
    size = f" at {resolution}x{resolution}" if resolution else ""
    count = f"{row['count']} " if row["count"] else ""
    dataset = f"{dataset} images" if dataset else "images of an unrecorded dataset"
    env_values = [v for v in os.environ.values() if len(v) >= _MIN_ENV_VALUE_LEN]
    settings = ", ".join(
        f"`{k}={_format_value(v)}`" for k, v in _flatten(row["settings"]).items()
        if v is not None and not (isinstance(v, str) and _leaks(v, env_values))
        and not any(w in k.lower() for w in _SECRET_WORDS)
    )
    return (
        f"Protocol: `klvae-eval` reconstructions of {count}{dataset}{size}; mean ± std over images "
        "(rFID is one value over the whole set). PSNR/SSIM on images quantized to uint8 as saved; LPIPS: lower is "
        "closer." + (f" Settings: {settings}." if settings else "")
    )


# ----------------------------------------------------------------------------------------------- model card


def _config(vae) -> dict:
    return dict(vae.config)


def architecture_rows(vae) -> list[tuple[str, str]]:
    """(label, value) rows describing the autoencoder, read from its config and parameters."""
    config = _config(vae)
    channels = list(config["block_out_channels"])
    factor = 2 ** (len(channels) - 1)
    latent = config["latent_channels"]
    n_params = sum(p.numel() for p in vae.parameters())
    n_enc = sum(p.numel() for p in vae.encoder.parameters())
    n_dec = sum(p.numel() for p in vae.decoder.parameters())
    rows = [
        ("Class", f"`{_model_class(json.loads(vae.to_json_string()))}`"),
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


def _model_class(config: Mapping) -> str:
    """Default architectures save as plain ``AutoencoderKL``; extended ones (e.g. squeeze-excitation) need KLVAE."""
    return "AutoencoderKL" if config.get("_class_name", "AutoencoderKL") == "AutoencoderKL" else "KLVAE"


def _usage_pipeline(config: Mapping) -> tuple[str, str]:
    """Which diffusers pipeline shares this latent layout, for the usage snippet."""
    if config["latent_channels"] == 4 and abs(config.get("scaling_factor", 0) - 0.13025) < 1e-6:
        return "StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0"
    if config["latent_channels"] == 4:
        return "StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5"
    return "DiffusionPipeline", "your-name/your-latent-diffusion-model"


def _limitations(config: Mapping, base_model: str | None, pipeline_base: str, has_metrics: bool) -> list[str]:
    """Honest caveats for the card, chosen from the config and what was recorded."""
    factor = 2 ** (len(config["block_out_channels"]) - 1)
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


def _card_images(images: Iterable[Path]) -> tuple[list[dict], list[dict]]:
    """Paths inside the staged folder -> (reconstruction images, loss-curve images) for the template."""
    recon, loss = [], []
    for path in images:
        entry = {"path": path.as_posix(), "caption": path.stem.replace("_", " ").replace("-", " ")}
        (loss if "loss" in path.stem.lower() else recon).append(entry)
    return recon, loss


def render_model_card(
    vae,
    *,
    repo_id: str,
    metrics: Any = None,
    metrics_model: str | None = None,
    images: Sequence[str | os.PathLike] = (),
    training_args: Any = None,
    base_model: str | None = None,
    datasets: str | Sequence[str] | None = None,
    license: str = DEFAULT_LICENSE,
    single_file_name: str | None = None,
    has_ema: bool = False,
    template_path: str | os.PathLike = TEMPLATE_PATH,
):
    """Build the model card (`huggingface_hub.ModelCard`) for a VAE.

    Args:
        vae (`KLVAE` or `AutoencoderKL`): the model; architecture and parameter counts are read from it.
        repo_id (`str`): ``"user/name"``; used in the usage snippet and as the model-index name.
        metrics (`dict` or path, *optional*, defaults to `None`): evaluation results, see `load_metrics`.
        metrics_model (`str`, *optional*, defaults to `None`): name (or local path) of this model's row in the
            metrics; `None` takes the only row, else the only row evaluated from a local path (baselines are Hub
            ids), else the first. Every row appears in the card's table; only this one goes into the model-index.
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
    from huggingface_hub import ModelCard, ModelCardData

    config = _config(vae)
    rows = load_metrics(metrics)
    ours = _pick(rows, metrics_model) if rows else None
    if isinstance(training_args, (str, os.PathLike)):
        training_args = _read_json(Path(training_args), what="training arguments")
    args = sanitize_training_args(training_args)
    withheld = set(_flatten(_plain(training_args or {}))) - set(_flatten(args))
    datasets = [datasets] if isinstance(datasets, str) else list(datasets) if datasets else None
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        library_name="diffusers", pipeline_tag=PIPELINE_TAG, tags=list(TAGS), license=license,
        base_model=base_model, datasets=datasets, model_name=model_name,
        eval_results=eval_results(ours) if ours else None,
    )
    evaluation = [
        {"name": f"{model_name} (this model)" if row is ours else (row["name"] or f"model {i}"),
         "count": row["count"] if row["count"] is not None else "–",
         **{key: _format_metric(key, row["metrics"].get(key)) for key in METRICS}}
        for i, row in enumerate(rows)
    ]
    pipeline_class, pipeline_base = _usage_pipeline(config)
    model_class = _model_class(json.loads(vae.to_json_string()))  # the class name the saved config.json will carry
    import_line = (f"from diffusers import AutoencoderKL, {pipeline_class}" if model_class == "AutoencoderKL" else
                   f"from diffusers import {pipeline_class}\nfrom diffusers_klvae import KLVAE")
    recon_images, loss_images = _card_images(Path(p) for p in images)
    card = ModelCard.from_template(
        card_data,
        template_path=os.fspath(template_path),
        model_name=model_name,
        repo_id=repo_id,
        factor=2 ** (len(config["block_out_channels"]) - 1),
        latent_channels=config["latent_channels"],
        shift_factor=config.get("shift_factor"),
        architecture=architecture_rows(vae),
        pipeline_class=pipeline_class,
        model_class=model_class,
        import_line=import_line,
        pipeline_base=pipeline_base,
        single_file_name=single_file_name,
        single_file_tools=single_file_tools(config) if single_file_name else None,
        has_ema=has_ema,
        training=training_rows(args, withheld),
        training_args_yaml=_yaml(args) if args else "",
        evaluation=evaluation,
        eval_protocol=_eval_protocol(ours) if ours else "",
        images=recon_images,
        loss_images=loss_images,
        limitations=_limitations(config, base_model, pipeline_base, has_metrics=bool(rows)),
    )
    card.text = re.sub(r"\n{3,}", "\n\n", card.text)  # optional sections leave runs of blank lines behind
    return card


def _yaml(data: Mapping) -> str:
    import yaml  # a dependency of huggingface_hub

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).strip()


# ----------------------------------------------------------------------------------------------- staging


def _materialize_ema(vae, ema):
    """EMA weights as a model: an `nn.Module` is used as is; diffusers' `EMAModel` is copied into a clone of `vae`."""
    if hasattr(ema, "save_pretrained") and hasattr(ema, "state_dict") and not hasattr(ema, "shadow_params"):
        return ema
    if hasattr(ema, "shadow_params") and hasattr(ema, "copy_to"):
        clone = copy.deepcopy(vae)
        ema.copy_to(clone.parameters())
        return clone
    raise ValueError(f"ema_vae must be a model with save_pretrained or a diffusers EMAModel, got {type(ema).__name__}")


def _architecture(model) -> dict:
    config = json.loads(model.to_json_string())
    return {k: v for k, v in config.items() if k not in ("_name_or_path", "_diffusers_version")}


def _stage_ema(vae, ema, folder: Path) -> None:
    """Write the EMA weights as the ``ema`` variant; the shared config.json must describe both models."""
    if _architecture(ema) != _architecture(vae):
        raise ValueError("ema_vae has a different config from vae; the EMA weights must track the same architecture")
    with tempfile.TemporaryDirectory(prefix="klvae-ema-") as tmp:
        ema.save_pretrained(tmp, safe_serialization=True, variant=EMA_VARIANT)
        shutil.copyfile(Path(tmp) / EMA_WEIGHTS_NAME, folder / EMA_WEIGHTS_NAME)


def single_file_tools(config: Mapping) -> str | None:
    """The tools that decode this architecture's original-layout file correctly, for the card; `None` when none do
    (then no single file is staged): ComfyUI and AUTOMATIC1111 build the SD KL-f8 VAE, ComfyUI also its 16-channel
    variant without quant convs."""
    from diffusers_klvae.models.single_file import single_file_mismatches

    if single_file_mismatches(config):
        return None
    return "ComfyUI" if config["latent_channels"] == 16 else "ComfyUI and AUTOMATIC1111"


def _as_klvae(vae):
    """A diffusers `AutoencoderKL` has no `save_single_file`; the same weights in a `KLVAE` do."""
    if hasattr(vae, "save_single_file"):
        return vae
    from diffusers_klvae import KLVAE

    clone = KLVAE.from_config(vae.config)
    clone.load_state_dict(vae.state_dict())
    return clone


def _strip_local_name(config_path: Path) -> None:
    """from_pretrained records the local folder as ``_name_or_path``; that absolute path must not be published."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.pop("_name_or_path", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _safe_image_name(name: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._") or "image"
    candidate, i = f"{stem}.png", 1
    while candidate in taken:
        candidate, i = f"{stem}_{i}.png", i + 1
    taken.add(candidate)
    return candidate


def _stage_images(images: Sequence, folder: Path) -> list[Path]:
    """Copy/save images (paths or PIL images) as PNGs under ``images/``; returns paths relative to ``folder``."""
    from PIL import Image

    if not images:
        return []
    (folder / IMAGES_SUBFOLDER).mkdir(parents=True, exist_ok=True)
    staged, taken = [], set()
    for index, image in enumerate(images):
        if isinstance(image, Image.Image):
            name = _safe_image_name(f"image_{index}", taken)
            image.save(folder / IMAGES_SUBFOLDER / name)
        else:
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"image not found: {os.fspath(path)!r} (expected a PNG/JPEG file)")
            name = _safe_image_name(path.name, taken)
            with Image.open(path) as img:  # re-encode as PNG: one format on the card, no EXIF (may hold paths/GPS)
                img.convert("RGB").save(folder / IMAGES_SUBFOLDER / name)
        staged.append(Path(IMAGES_SUBFOLDER) / name)
    return staged


def stage_folder(
    vae,
    folder: str | os.PathLike,
    *,
    repo_id: str,
    ema_vae=None,
    metrics: Any = None,
    metrics_model: str | None = None,
    images: Sequence = (),
    training_args: Any = None,
    base_model: str | None = None,
    datasets: str | Sequence[str] | None = None,
    license: str = DEFAULT_LICENSE,
    single_file: bool | None = None,
) -> Path:
    """Write everything a Hub repo of this VAE needs into an empty ``folder``.

    Args:
        vae (`KLVAE` or `AutoencoderKL`): the weights published at the root.
        folder (path): where to stage; created if missing, must be empty (stale files would be uploaded).
        repo_id (`str`): ``"user/name"``; the single file is named ``<name>.safetensors``.
        ema_vae (model or `diffusers.training_utils.EMAModel`, *optional*, defaults to `None`): saved as the ``ema``
            weights variant (``diffusion_pytorch_model.ema.safetensors``); it must share ``vae``'s architecture.
        single_file (`bool`, *optional*, defaults to `None`): also write the original-layout single file. `None`:
            when the architecture is one ComfyUI/A1111 load (``KLVAE.save_single_file``); `True` requires it.
        metrics, metrics_model, images, training_args, base_model, datasets, license: see `render_model_card`;
            ``images`` are paths or PIL images.

    Returns:
        `Path`: the staged folder.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"staging folder {os.fspath(folder)!r} is not empty; pass a new or empty folder")
    _check_repo_id(repo_id)
    folder.mkdir(parents=True, exist_ok=True)

    vae.save_pretrained(folder, safe_serialization=True)
    _strip_local_name(folder / CONFIG_NAME)
    if ema_vae is not None:
        _stage_ema(vae, _materialize_ema(vae, ema_vae), folder)
    single_file_name = None
    if single_file or (single_file is None and single_file_tools(vae.config)):
        single_file_name = f"{repo_id.split('/')[-1]}.safetensors"
        _as_klvae(vae).save_single_file(folder / single_file_name)
    staged_images = _stage_images(list(images or ()), folder)

    card = render_model_card(
        vae, repo_id=repo_id, metrics=metrics, metrics_model=metrics_model, images=staged_images,
        training_args=training_args, base_model=base_model, datasets=datasets, license=license,
        single_file_name=single_file_name, has_ema=ema_vae is not None,
    )
    card.save(folder / CARD_NAME)
    return folder


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not re.fullmatch(r"([\w.-]+/)?[\w.-]+", repo_id or ""):
        raise ValueError(f"repo_id must look like 'user/name' or 'name', got {repo_id!r}")


# ----------------------------------------------------------------------------------------------- validation


def _local_markers(folder: Path) -> list[re.Pattern]:
    """Local absolute paths that must not appear in any published text file, as whole-path patterns (so that the
    working directory ``/data`` does not match the dataset id ``someone/data``)."""
    paths = {os.fspath(folder.resolve()), os.fspath(Path.cwd()), tempfile.gettempdir(), os.fspath(Path.home())}
    paths = sorted(p.rstrip("/\\") for p in paths if len(p.rstrip("/\\")) > 1)
    return [re.compile(r"(?<![\w.~-])" + re.escape(p) + r"(?![\w.-])") for p in paths]


def validate_folder(folder: str | os.PathLike, *, token: str | None = None) -> None:
    """Check a staged folder before anything is uploaded; raises ``ValueError`` listing every problem.

    Args:
        folder (path): the staged folder.
        token (`str`, *optional*, defaults to `None`): the token about to be used; it must not appear in any file.

    Checks: ``config.json`` (a diffusers config with ``_class_name``) and ``diffusion_pytorch_model.safetensors``
    at the root; every ``.safetensors`` readable and non-empty (single file and ``ema`` variant included);
    ``README.md`` with YAML metadata holding ``library_name``, ``license`` and ``tags``; no Hub token, given token or
    local absolute path in any text file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"staged folder not found: {os.fspath(folder)!r}")
    problems = _weight_problems(folder) + _card_problems(folder) + _leak_problems(folder, token)
    if problems:
        raise ValueError(f"staged folder {os.fspath(folder)!r} is not ready to upload:\n  - " + "\n  - ".join(problems))


def _weight_problems(folder: Path) -> list[str]:
    from safetensors import safe_open

    problems = []
    if not (folder / WEIGHTS_NAME).is_file():
        problems.append(f"missing weights {WEIGHTS_NAME}")
    if not (folder / CONFIG_NAME).is_file():
        problems.append(f"missing {CONFIG_NAME}")
    else:
        try:
            if "_class_name" not in json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")):
                problems.append(f"{CONFIG_NAME} has no _class_name (not a diffusers config)")
        except json.JSONDecodeError as err:
            problems.append(f"{CONFIG_NAME} is not valid JSON: {err}")
    for path in sorted(folder.rglob("*.safetensors")):
        rel = path.relative_to(folder).as_posix()
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                if not list(f.keys()):
                    problems.append(f"{rel} holds no tensors")
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            problems.append(f"{rel} is not a readable safetensors file: {err}")
    return problems


def _card_problems(folder: Path) -> list[str]:
    from huggingface_hub import ModelCard

    card_path = folder / CARD_NAME
    if not card_path.is_file():
        return [f"missing model card {CARD_NAME}"]
    if not card_path.read_text(encoding="utf-8").startswith("---"):
        return [f"{CARD_NAME} has no YAML metadata block"]
    try:
        data = ModelCard.load(card_path).data.to_dict()
    except ValueError as err:
        return [f"{CARD_NAME} metadata does not parse: {err}"]
    missing = [k for k in ("library_name", "license", "tags") if not data.get(k)]
    return [f"{CARD_NAME} metadata lacks {', '.join(missing)}"] if missing else []


def _leak_problems(folder: Path, token: str | None) -> list[str]:
    problems, markers = [], _local_markers(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES):
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(folder).as_posix()
        if (token and token in text) or _HF_TOKEN_RE.search(text):
            problems.append(f"{rel} contains an access token")
        problems += [f"{rel} contains the local path {m.pattern!r}" for m in markers if m.search(text)]
    return problems


# ----------------------------------------------------------------------------------------------- upload


def publish(
    vae,
    repo_id: str,
    *,
    folder: str | os.PathLike | None = None,
    metrics: Any = None,
    images: Sequence | None = None,
    training_args: Any = None,
    base_model: str | None = None,
    datasets: str | Sequence[str] | None = None,
    license: str = DEFAULT_LICENSE,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    ema_vae=None,
    metrics_model: str | None = None,
    api=None,
) -> str:
    """Stage, validate and upload a VAE as one Hub commit; returns the commit URL.

    Args:
        vae (`KLVAE` or `AutoencoderKL`): the model to publish (its weights go to the repo root).
        repo_id (`str`): ``"user/name"`` (or ``"name"`` for your own namespace).
        folder (path, *optional*, defaults to `None`): staging folder (must be empty); `None` uses a temporary one,
            deleted afterwards.
        metrics (`dict` or path, *optional*, defaults to `None`): ``klvae-eval`` results, see `load_metrics`.
        images (sequence of paths or PIL images, *optional*, defaults to `None`): reconstruction grid, loss curves.
        training_args (`dict`/Namespace/dataclass/path, *optional*, defaults to `None`): sanitized before use.
        base_model (`str`, *optional*, defaults to `None`): Hub id of the VAE this one was fine-tuned from.
        datasets (`str` or list, *optional*, defaults to `None`): Hub ids of the training datasets.
        license (`str`, *optional*, defaults to ``"openrail++"``): Hub license id.
        private (`bool`, *optional*, defaults to `False`): create the repo private.
        token (`str`, *optional*, defaults to `None`): Hub token; `None` uses huggingface_hub's sources (``HF_TOKEN``,
            the ``hf auth login`` cache). It is only handed to the API calls, never written.
        commit_message (`str`, *optional*): the commit's message.
        ema_vae (model or `EMAModel`, *optional*, defaults to `None`): EMA weights, uploaded as the ``ema`` variant.
        metrics_model (`str`, *optional*, defaults to `None`): this model's row in multi-model metrics.
        api (`huggingface_hub.HfApi`, *optional*, defaults to `None`): the client to use (tests pass a stand-in).

    Returns:
        `str`: the URL of the commit.

    Raises:
        `ValueError`: the staged folder failed validation; nothing was uploaded.
    """
    with tempfile.TemporaryDirectory(prefix="klvae-push-") as tmp:
        staged = stage_folder(
            vae, Path(folder) if folder is not None else Path(tmp) / "repo", repo_id=repo_id, ema_vae=ema_vae,
            metrics=metrics, metrics_model=metrics_model, images=images or (), training_args=training_args,
            base_model=base_model, datasets=datasets, license=license,
        )
        validate_folder(staged, token=token)
        return upload_staged(staged, repo_id, private=private, token=token, commit_message=commit_message, api=api)


def upload_staged(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                  commit_message: str = DEFAULT_COMMIT_MESSAGE, api=None) -> str:
    """``create_repo(exist_ok=True)`` + one ``upload_folder`` commit of a validated folder; returns the commit URL."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    repo_url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id  # "name" resolves to "user/name"
    commit = api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), repo_type="model", token=token,
                               commit_message=commit_message)
    logger.info("uploaded %s to %s", os.fspath(folder), commit.commit_url)
    return commit.commit_url


def push_checkpoint_async(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    *,
    path_in_repo: str | None = None,
    token: str | None = None,
    private: bool = True,
    commit_message: str | None = None,
    ignore_patterns: Sequence[str] | None = None,
    api=None,
) -> Future:
    """Upload a training checkpoint folder on a background thread, so training does not wait.

    The folder is first copied to a temporary snapshot (cheap next to the upload) because checkpoint rotation may
    delete or rewrite it while the upload runs; the snapshot is removed when the upload ends.

    Args:
        checkpoint_dir (path): the checkpoint folder (e.g. ``output/checkpoint-5000``).
        repo_id (`str`): the Hub repo (created if missing).
        path_in_repo (`str`, *optional*, defaults to `None`): where it goes; `None` -> ``checkpoints/<folder name>``.
        token (`str`, *optional*, defaults to `None`): as in `publish`.
        private (`bool`, *optional*, defaults to `True`): used only if the repo must be created; checkpoints are
            work in progress, so private by default.
        commit_message (`str`, *optional*, defaults to `None`): `None` -> ``"Checkpoint <folder name>"``.
        ignore_patterns (list of `str`, *optional*, defaults to `None`): e.g. ``["optimizer*.bin"]`` to skip states.
        api (`huggingface_hub.HfApi`, *optional*, defaults to `None`): pass the same instance to every call: its
            single worker thread then uploads checkpoints one at a time, in order. `None` creates a new client.

    Returns:
        `concurrent.futures.Future`: resolves to the commit URL; ``.result()`` re-raises upload errors.
    """
    source = Path(checkpoint_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {os.fspath(source)!r}")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    snapshot = Path(tempfile.mkdtemp(prefix="klvae-ckpt-")) / source.name
    shutil.copytree(source, snapshot)
    path_in_repo = path_in_repo if path_in_repo is not None else f"checkpoints/{source.name}"
    message = commit_message or f"Checkpoint {source.name}"

    def push() -> str:
        try:
            url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
            commit = api.upload_folder(
                repo_id=getattr(url, "repo_id", None) or repo_id, folder_path=os.fspath(snapshot),
                path_in_repo=path_in_repo, repo_type="model", token=token, commit_message=message,
                ignore_patterns=list(ignore_patterns) if ignore_patterns else None,
            )
            return commit.commit_url
        finally:
            shutil.rmtree(snapshot.parent, ignore_errors=True)

    return api.run_as_future(push)


# ----------------------------------------------------------------------------------------------- command line


def _model_subfolder(model: Path) -> str | None:
    """Where config.json sits: the folder itself (``None``), or ``vae`` in a pipeline folder."""
    if (model / CONFIG_NAME).is_file():
        return None
    if (model / "vae" / CONFIG_NAME).is_file():
        return "vae"
    raise FileNotFoundError(
        f"no model at {os.fspath(model)!r}: expected a folder with config.json + {WEIGHTS_NAME}, a pipeline folder "
        "with vae/, or an original-layout .safetensors file"
    )


def has_variant(model: str | os.PathLike, variant: str = EMA_VARIANT) -> bool:
    """Whether a model folder (or a pipeline folder's ``vae/``) holds the ``variant`` weights."""
    model = Path(model)
    if model.is_file():
        return False
    subfolder = _model_subfolder(model)
    return (model / (subfolder or "") / f"diffusion_pytorch_model.{variant}.safetensors").is_file()


def load_vae(model: str | os.PathLike, variant: str | None = None):
    """Load a trained VAE as a `KLVAE`: the one reader of the layout training writes.

    Args:
        model (path): a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, and the
            EMA weights as the ``ema`` variant, ``diffusion_pytorch_model.ema.safetensors``, beside them: the final
            output of training), a pipeline folder with ``vae/``, or an original-layout ``.safetensors`` file.
        variant (`str`, *optional*, defaults to `None`): a weights variant, e.g. ``EMA_VARIANT`` for the EMA weights.
    """
    from diffusers_klvae import KLVAE

    model = Path(model)
    if model.is_file() and model.suffix == ".safetensors":
        if variant is not None:
            raise ValueError(f"a single file has no weights variants; got variant={variant!r} for {os.fspath(model)!r}")
        return KLVAE.from_single_file(os.fspath(model))
    subfolder = _model_subfolder(model)
    if variant is not None and not has_variant(model, variant):
        raise FileNotFoundError(f"no {variant!r} weights in {os.fspath(model)!r}: expected "
                                f"diffusion_pytorch_model.{variant}.safetensors beside config.json")
    return KLVAE.from_pretrained(os.fspath(model), subfolder=subfolder, variant=variant)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klvae-push",
        description="Publish a trained VAE to the Hugging Face Hub (weights, single file, images, model card). "
        "The token comes from HF_TOKEN or `hf auth login`; it is never written anywhere.",
    )
    parser.add_argument("model_dir", type=Path, help="diffusers-format VAE folder (or pipeline folder / .safetensors)")
    parser.add_argument("--repo-id", required=True, help="Hub repo, 'user/name'")
    parser.add_argument("--metrics", type=Path, help="klvae-eval JSON")
    parser.add_argument("--metrics-model", help="this model's name in a multi-model metrics file (default: first)")
    parser.add_argument("--images", type=Path, nargs="+", default=[], help="reconstruction grid / loss-curve PNGs")
    parser.add_argument("--training-args", type=Path, help="JSON of the training arguments (secrets are dropped)")
    parser.add_argument("--no-ema", action="store_true",
                        help=f"do not publish the EMA weights (the '{EMA_VARIANT}' variant in MODEL_DIR, published by default)")
    parser.add_argument("--base-model", help="Hub id of the VAE this one was fine-tuned from")
    parser.add_argument("--dataset", nargs="+", help="Hub ids of the training datasets")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help=f"Hub license id (default: {DEFAULT_LICENSE})")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
    parser.add_argument("--folder", type=Path, help="staging folder (must be empty; default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="stage and validate, list the files, upload nothing")
    return parser


def _metrics_row_name(metrics: Path | None, model_dir: Path) -> str | None:
    """klvae-eval names a local model by its path: the metrics row evaluated from MODEL_DIR, if any."""
    if metrics is None:
        return None
    return next((r["raw_name"] for r in load_metrics(metrics) if _same_path(r["raw_name"], model_dir)), None)


def _print_listing(folder: Path, repo_id: str) -> None:
    # The listing is this command's product (stdout), not a log message.
    print(f"dry run: would upload {folder} to https://huggingface.co/{repo_id} (nothing uploaded)")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(folder).as_posix():<48} {path.stat().st_size / 1e6:9.2f} MB")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        vae = load_vae(args.model_dir)
        with_ema = not args.no_ema and has_variant(args.model_dir, EMA_VARIANT)
        options = dict(
            ema_vae=load_vae(args.model_dir, variant=EMA_VARIANT) if with_ema else None, metrics=args.metrics,
            metrics_model=args.metrics_model or _metrics_row_name(args.metrics, args.model_dir), images=args.images,
            training_args=args.training_args, base_model=args.base_model, datasets=args.dataset, license=args.license,
        )
        if args.dry_run:
            folder = args.folder or Path(tempfile.mkdtemp(prefix="klvae-push-")) / "repo"
            stage_folder(vae, folder, repo_id=args.repo_id, **options)
            validate_folder(folder)
            _print_listing(folder, args.repo_id)
            return 0
        print(publish(vae, args.repo_id, folder=args.folder, private=args.private,
                      commit_message=args.commit_message, **options))
        return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"klvae-push: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
