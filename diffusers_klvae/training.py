"""The pieces of ``train_autoencoder.py``'s step: models, optimizers, the G/D update, the EMA (its weights are saved
by ``loading.save_model_folder``, the one layout of a model folder).

References: CompVis latent-diffusion ``contperceptual.py`` (the G/D recipe), nanoGPT ``train.py`` (loop layout).
"""

from __future__ import annotations

import logging
import math
import re
import warnings

import torch

from .train_config import DEFAULT_PRESET, TrainConfig, load_model_config

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------- model, loss, optimizers, schedulers

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
    from .loading import load_vae

    if pretrained_model_name_or_path:  # the one loader of every tool: folder, pipeline folder, single file, Hub id
        return load_vae(pretrained_model_name_or_path, revision=revision, subfolder=subfolder)
    if model_config_name_or_path:
        return KLVAE.from_config(load_model_config(model_config_name_or_path))
    return KLVAE.from_preset(preset or DEFAULT_PRESET)


def freeze_encoder(vae) -> None:
    """Decoder-only fine-tuning: the encoder and ``quant_conv`` define the latent space existing UNets know."""
    vae.encoder.requires_grad_(False)
    if getattr(vae, "quant_conv", None) is not None:
        vae.quant_conv.requires_grad_(False)


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
                        disc_factor=cfg.disc_factor, disc_loss=cfg.disc_loss, lpips_net=cfg.lpips_net,
                        learn_logvar=cfg.learn_logvar)
    return disc, loss_fn


def build_optimizers(vae, disc, *, learning_rate: float, disc_learning_rate: float, betas: tuple[float, float] = (0.5, 0.9),
                     weight_decay: float = 0.0, eps: float = 1e-8, loss_params=()) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW for the VAE's trainable parameters and for the discriminator.

    Args:
        vae, disc (`nn.Module`): the (unwrapped) models; frozen parameters are left out.
        learning_rate, disc_learning_rate (`float`): peak rates.
        betas (`tuple`, *optional*, defaults to `(0.5, 0.9)`): LDM/taming's GAN betas.
        weight_decay (`float`, *optional*, defaults to 0.0), eps (`float`, *optional*, defaults to 1e-8).
        loss_params (*optional*): the loss's own parameters (``loss_fn.trainable_parameters()``), updated with the VAE.
    """
    params = [p for p in vae.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the VAE has no trainable parameters")
    params += list(loss_params)
    opt_vae = torch.optim.AdamW(params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)
    opt_disc = torch.optim.AdamW(disc.parameters(), lr=disc_learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)
    return opt_vae, opt_disc


def build_ema(vae, *, decay: float):
    """diffusers' ``EMAModel`` over all VAE parameters (frozen ones are copied, so they stay equal)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(vae.parameters(), decay=decay, model_cls=type(vae), model_config=vae.config)


def build_schedulers(optimizers, *, name: str, warmup_steps: int, max_train_steps: int, num_processes: int):
    """diffusers' ``get_scheduler`` for each optimizer.

    Accelerate's prepared scheduler steps once per process per update (it assumes the dataset is split), so
    steps are counted ``num_processes`` times, as in diffusers' training examples.
    """
    from diffusers.optimization import get_scheduler

    return tuple(get_scheduler(name, optimizer=opt, num_warmup_steps=warmup_steps * num_processes,
                               num_training_steps=max_train_steps * num_processes) for opt in optimizers)


def check_restored_hyperparameters(cfg: TrainConfig, optimizers, *, lr_scale: float, checkpoint: str) -> None:
    """After a resume: refuse optimizer flags that differ from what the restored state holds.

    Accelerate restores the optimizers' parameter groups (rate, betas, eps, weight decay) and the schedulers' base
    rates, so a changed flag would be silently ignored while ``training_args.json`` and the model card recorded it.
    (The schedule's shape, ``--lr_scheduler``, ``--lr_warmup_steps`` and ``--max_train_steps``, is not saved: it
    follows the command line.) ``lr_scale`` is ``--scale_lr``'s factor, 1 without it.
    """
    group_vae, group_disc = (opt.param_groups[0] for opt in optimizers)
    restored = {"learning_rate": group_vae.get("initial_lr", group_vae["lr"]) / lr_scale,
                "disc_learning_rate": group_disc.get("initial_lr", group_disc["lr"]) / lr_scale,
                "adam_beta1": group_vae["betas"][0], "adam_beta2": group_vae["betas"][1],
                "adam_weight_decay": group_vae["weight_decay"], "adam_epsilon": group_vae["eps"]}
    # printed with 6 digits: passing those back works
    differing = {flag: saved for flag, saved in restored.items() if not math.isclose(getattr(cfg, flag), saved, rel_tol=1e-5)}
    if differing:
        given = " and ".join(f"--{flag} {getattr(cfg, flag):g}" for flag in differing)
        scaled = (f" (this run's --scale_lr multiplies the rates by {lr_scale:g}: batch size x accumulation x processes)"
                  if lr_scale != 1 and any(flag.endswith("learning_rate") for flag in differing) else "")
        raise ValueError(f"{given}{scaled} differs from the {' and '.join(f'{v:g}' for v in differing.values())} of "
                         f"the run saved in {checkpoint}, whose optimizer state a resume restores: pass "
                         f"{' '.join(f'--{flag} {v:g}' for flag, v in differing.items())} to continue that run, or "
                         "start a new run for the new value")


def prepare(accelerator, vae, disc, optimizers, schedulers):
    """``accelerator.prepare`` of everything, with the discriminator left in fp32.

    ``prepare`` wraps every model's forward in autocast under mixed precision; the discriminator's wrapper is
    removed again (``keep_fp32_wrapper=False`` does that in place), because LDM's hinge loss on fp16 logits and
    fp16 D gradients are what ``losses.py`` promises not to have. The VAE keeps its autocast.
    """
    vae, disc, *prepared = accelerator.prepare(vae, disc, *optimizers, *schedulers)
    accelerator.unwrap_model(disc, keep_fp32_wrapper=False)
    return vae, disc, tuple(prepared[:2]), tuple(prepared[2:])


# --------------------------------------------------------------------------------------------------- the step


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
    from .latent_masks import apply_pixel_mask, mask_to_latent, random_pixel_mask

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
            for p in loss_fn.trainable_parameters():  # outside DDP: average their gradients as DDP does the VAE's
                if p.grad is not None and accelerator.num_processes > 1:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
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

    Accelerate has one GradScaler (fp16) for all: ``unscale_`` and ``step`` each, ``update()`` once (PyTorch's recipe).
    Not ``accelerator.clip_grad_norm_`` (unscales every optimizer) nor a prepared ``step()`` (``update()`` after
    each): with a D gradient accumulated over micro-batches, part of it would be divided by the loss scale twice."""
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
