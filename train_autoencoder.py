#!/usr/bin/env python
"""Train or fine-tune a KL autoencoder (KLVAE, diffusers' AutoencoderKL format) with Accelerate, resuming exactly.

    accelerate launch train_autoencoder.py --pretrained_model_name_or_path stabilityai/sd-vae-ft-mse --decoder_only \
        --dataset_name <hub/images> --resolution 256 --train_batch_size 4 --use_ema --output_dir sd-vae-ft

The loop only; its pieces are in the package: the command line in ``train_config``, models and the step in
``training``, checkpoints in ``checkpoints``, validation and the final model in ``train_outputs``, the data stream
in ``data``, the loss in ``losses``. See docs/training.md.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import tarfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from datasets.exceptions import DatasetsError
from huggingface_hub import HfApi
from safetensors import SafetensorError
from tqdm.auto import tqdm

from diffusers_klvae import checkpoint_state, checkpoints, data, hub, train_config, train_outputs, training
from diffusers_klvae.cli_support import EXIT_USAGE, one_line, writing

logger = logging.getLogger("train_autoencoder")
# what a user's input or machine can raise (datasets' own errors included): one line and exit status 2, no traceback
USER_ERRORS = (ValueError, OSError, RuntimeError, pickle.UnpicklingError, SafetensorError, DatasetsError, tarfile.TarError)


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (bad arguments raise ``ValueError`` before any work) and train; see :func:`train`."""
    return train(train_config.parse_args(argv))


def train(cfg: train_config.TrainConfig) -> dict:
    """Run training (cfg is frozen: nothing changes it); returns the last validation metrics and ``output_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    out = Path(cfg.output_dir)
    # several processes, no GPU: Accelerate sets up MULTI_CPU (gloo) only when asked for the CPU, else all are rank 0
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_cpu, gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    seed = 0 if cfg.seed is None else cfg.seed  # the data stream needs one to be resumable
    if cfg.seed is not None:
        set_seed(cfg.seed)
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out.mkdir(parents=True, exist_ok=True)
    # the main process locks `out`: a second run on it refuses
    with checkpoints.output_dir_lock(out) if accelerator.is_main_process else nullcontext():
        resume = checkpoints.resolve_resume_path(cfg.resume_from_checkpoint, out)
        if resume is None or not resume.resolve().is_relative_to(out.resolve()):
            # a new run, or another folder's run continued here: not over an earlier run, nor into other files
            checkpoints.check_no_earlier_run(out, resume=resume)
        if resume is not None:
            checkpoints.check_resume_step(resume, cfg.max_train_steps)
        with writing(out):  # a full disk anywhere in the run: one DiskFull naming the folder
            return _train(cfg, accelerator, out, seed, resume)


def _train(cfg: train_config.TrainConfig, accelerator, out: Path, seed: int, resume: Path | None) -> dict:
    rank, world = accelerator.process_index, accelerator.num_processes

    # 1) data: held-out validation images, then this process's shard of the stream (validation images excluded)
    dataset = data.load_image_dataset(**train_config.data_source_kwargs(cfg))
    if cfg.validation_images:
        val = data.load_validation_images(cfg.validation_images, resolution=cfg.resolution)
    else:
        val = data.take_validation_images(dataset, cfg.num_validation_images, image_column=cfg.image_column, resolution=cfg.resolution) if cfg.num_validation_images else None
    stream = data.make_train_stream(
        dataset, image_column=cfg.image_column, resolution=cfg.resolution, batch_size=cfg.train_batch_size,
        center_crop=cfg.center_crop, random_flip=cfg.random_flip, crop_zoom=cfg.crop_zoom, shuffle_buffer_size=cfg.shuffle_buffer_size,
        seed=seed, process_index=rank, num_processes=world, exclude=val.keys if val is not None else frozenset(),
        num_threads=cfg.dataloader_num_workers)

    # 2) models: VAE (+ freezing, EMA), discriminator, loss (holds LPIPS)
    vae = training.build_vae(pretrained_model_name_or_path=cfg.pretrained_model_name_or_path, model_config_name_or_path=cfg.model_config_name_or_path,
                             preset=cfg.preset, revision=cfg.revision, subfolder=cfg.subfolder)
    if cfg.decoder_only:
        training.freeze_encoder(vae)
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()
    disc, loss_fn = training.build_loss(cfg, distributed=world > 1 and accelerator.device.type != "cpu")
    ema = training.build_ema(vae, decay=cfg.ema_decay) if cfg.use_ema else None
    factor = vae.downsampling_factor

    # 3) optimizers, schedulers, prepare (DDP wrapping, autocast, device placement)
    scale = cfg.train_batch_size * cfg.gradient_accumulation_steps * world if cfg.scale_lr else 1
    optimizers = training.build_optimizers(vae, disc, learning_rate=cfg.learning_rate * scale, disc_learning_rate=cfg.disc_learning_rate * scale,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                                           loss_params=loss_fn.trainable_parameters())
    schedulers = training.build_schedulers(optimizers, name=cfg.lr_scheduler, warmup_steps=cfg.lr_warmup_steps,
                                           max_train_steps=cfg.max_train_steps, num_processes=world)
    vae, disc, optimizers, schedulers = training.prepare(accelerator, vae, disc, optimizers, schedulers)
    loss_fn.discriminator = disc  # the D loss goes through the DDP wrapper (gradient sync)
    loss_fn.to(accelerator.device)
    if ema is not None:
        ema.to(accelerator.device)
    generator = torch.Generator().manual_seed(seed * 1000 + rank)  # posterior samples and masks; per process
    checkpoint_state.register_checkpoint_state(accelerator, ema=ema, generator=generator, data_stream=stream, loss_fn=loss_fn)

    # 4) resume (it restores the RNG states the loop continues from), then the run's arguments and trackers. Nothing
    #    is written before the checkpoint loaded and its optimizer flags matched (a refused resume changes nothing)
    step, history, train_seconds, metrics = 0, [], 0.0, {}
    if resume is not None:
        state = checkpoints.load_checkpoint(accelerator, resume, use_ema=ema is not None)
        training.check_restored_hyperparameters(cfg, optimizers, lr_scale=scale, checkpoint=str(resume))
        step, history, train_seconds = state["step"], state.get("history", []), state.get("train_seconds", 0.0)
        metrics = state.get("metrics", {})  # the last validation, for the model card of a run killed in its final save
        if accelerator.is_main_process:
            checkpoints.set_aside_abandoned(out, resume)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # what the card is made from, for klvae-push --training-args (no token in it: a token is never an argument)
        (out / checkpoints.TRAINING_ARGS).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        accelerator.init_trackers(cfg.tracker_project_name, config=train_config.tracker_config(cfg))
    # one client for all pushes: its single worker thread uploads the checkpoints in order
    hub_futures, hub_api = [], HfApi() if (cfg.push_to_hub or cfg.hub_push_checkpoints) and accelerator.is_main_process else None
    batches = iter(stream)
    images_per_update = cfg.train_batch_size * cfg.gradient_accumulation_steps * world
    history_every = max(1, cfg.max_train_steps // 2000)  # the loss curve keeps ~2000 points (it is checkpointed)
    logger.info("training steps %d..%d on %d process(es), %d images per update", step + 1, cfg.max_train_steps, world, images_per_update)

    # the bar closes on an error too, so that a one-line error is the last line on stderr
    with tqdm(total=cfg.max_train_steps, initial=step, desc="steps", disable=not accelerator.is_main_process, dynamic_ncols=True) as progress:
        while step < cfg.max_train_steps:
            # 5) one update = gradient_accumulation_steps micro-batches; masks and posterior draw from `generator`
            t0 = time.perf_counter()
            for _ in range(cfg.gradient_accumulation_steps):
                x = next(batches)["pixel_values"].to(accelerator.device)  # (B, 3, H, W) in [-1, 1]
                if cfg.debug_process_logs:
                    train_outputs.log_seen_images(out / f"seen_images-{rank}.txt", x)
                latent_mask, target = training.mask_batch(x, factor=factor, prob=cfg.latent_mask_prob, kind=cfg.mask_generator, generator=generator)
                logs = training.train_step(accelerator, vae, disc, loss_fn, optimizers, x, step, generator=generator, schedulers=schedulers,
                                           ema=ema, max_grad_norm=cfg.max_grad_norm, latent_mask=latent_mask, target=target,
                                           alternate_gan_steps=cfg.alternate_gan_steps)
            step += 1

            # 6) log: progress bar (loss terms, images/s, skipped images), trackers, curve history
            step_seconds = time.perf_counter() - t0
            train_seconds += step_seconds
            logs.update(images_per_s=images_per_update / step_seconds, skipped=stream.skipped)
            accelerator.log(logs, step=step)
            progress.update(1)
            progress.set_postfix(train_outputs.postfix(logs), refresh=False)
            if step % history_every == 0 or step == cfg.max_train_steps:
                history.append({"step": step, **{k: v for k, v in logs.items() if k not in ("images_per_s", "skipped")}})

            # 7) validation (main process, EMA weights if on), then checkpoint (every process writes its own state)
            if val is not None and (step % cfg.validation_steps == 0 or step == cfg.max_train_steps):
                seen = {"images_seen": step * images_per_update, "train_seconds": round(train_seconds, 1)}
                validate = partial(train_outputs.run_validation, accelerator, vae, ema, val.pixel_values, step, out,
                                   lpips_model=loss_fn.perceptual, extra=seen)
                # main process only, but every process learns whether it failed (a full disk ends them all)
                result = checkpoints.write_together(accelerator, out / "validation", validate if accelerator.is_main_process else None)
                metrics = result if accelerator.is_main_process else metrics
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
                path = checkpoints.save_checkpoint(accelerator, out, step, total_limit=cfg.checkpoints_total_limit,
                                                   training_state={"history": history, "train_seconds": train_seconds, "metrics": metrics})
                if cfg.hub_push_checkpoints and accelerator.is_main_process:
                    hub_futures.append(hub.push_checkpoint_async(path, cfg.hub_model_id, api=hub_api))

    # 8) final model (raw weights + the EMA as the "ema" variant), loss curve, model card, optional push
    accelerator.wait_for_everyone()
    if cfg.debug_process_logs:
        train_outputs.dump_process_weights(accelerator, vae, loss_fn, out / f"weights-{rank}.safetensors")
    if accelerator.is_main_process:
        train_outputs.finish(accelerator, vae, ema, cfg, history=history, metrics=metrics, hub_futures=hub_futures, hub_api=hub_api)
    accelerator.end_training()
    return {**metrics, "output_dir": str(out), "skipped": stream.skipped}


if __name__ == "__main__":
    # bad arguments, a model or data that cannot be opened (before any work), then the folder, the disk, the data,
    # a model or checkpoint file, the machine: one line on stderr, exit status 2 (as every klvae command)
    try:
        train(train_config.parse_args(sys.argv[1:]))
    except USER_ERRORS as err:
        sys.stderr.write(f"train_autoencoder.py: error: {one_line(err)}\n")
        # several processes: a peer that has exited already can make gloo abort (SIGABRT) in this one's teardown
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_USAGE)
        sys.exit(EXIT_USAGE)
