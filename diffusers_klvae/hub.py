"""Publish a trained KL autoencoder on the Hugging Face Hub (``klvae-push``): stage the repo folder (weights, ``ema``
variant, original-layout single file, images, model card), check it (``publish_checks``), then upload it as one commit.
Nothing leaves the machine before `publish`; the token is handed to the API calls only, never written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Sequence

import huggingface_hub
from PIL import Image

from . import KLVAE
from .cli_support import OneLineParser, check_output_folder, run_command, writing
from .eval_results import load_metrics
from .imaging import load_image
from .loading import (CONFIG_NAME, EMA_VARIANT, EMA_WEIGHTS_NAME, WEIGHTS_NAME, has_variant, load_vae,
                      save_model_folder, stored_dtype, update_config)
from .model_card import DEFAULT_LICENSE, render_model_card, same_path, single_file_tools
from .publish_checks import CARD_NAME, LICENSE_ID, REPO_ID, sanitize_training_args, validate_folder

__all__ = [  # the publishing API; the names from loading, model_card and publish_checks stay importable from here
    "CONFIG_NAME", "EMA_VARIANT", "EMA_WEIGHTS_NAME", "WEIGHTS_NAME", "has_variant", "load_vae", "load_metrics",
    "render_model_card", "sanitize_training_args", "single_file_tools", "stage_folder", "validate_folder", "publish",
    "upload_staged", "push_checkpoint_async", "main",
]

logger = logging.getLogger(__name__)

IMAGES_SUBFOLDER = "images"
DEFAULT_COMMIT_MESSAGE = "Upload KL autoencoder with diffusers-klvae"


# ----------------------------------------------------------------------------------------------- staging
def _check_ema(vae, ema) -> None:
    """``ema_vae`` is diffusers' `EMAModel` or a model of ``vae``'s config (the weight files share one config.json)."""
    if all(hasattr(ema, name) for name in ("shadow_params", "copy_to", "store")):
        return
    if not (hasattr(ema, "save_pretrained") and hasattr(ema, "to_json_string")):
        raise ValueError(f"ema_vae must be a model with save_pretrained or a diffusers EMAModel, got {type(ema).__name__}")
    ours, theirs = ({k: v for k, v in json.loads(model.to_json_string()).items()
                     if k not in ("_name_or_path", "_diffusers_version")} for model in (vae, ema))
    if ours != theirs:
        raise ValueError("ema_vae has a different config from vae; the EMA weights must track the same architecture")


def _as_klvae(vae):
    """A diffusers `AutoencoderKL` has no `save_single_file`; the same weights in a `KLVAE` do."""
    if hasattr(vae, "save_single_file"):
        return vae
    clone = KLVAE.from_config(vae.config)
    clone.load_state_dict(vae.state_dict())
    return clone


def _stage_images(images: Sequence, folder: Path) -> list[Path]:
    """Save images (paths or PIL images) as PNGs under ``images/``; returns paths relative to ``folder``."""
    staged, taken = [], set()
    for index, image in enumerate(images):
        name = f"image_{index}"
        if not isinstance(image, Image.Image):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"image not found: {os.fspath(path)!r} (expected a PNG/JPEG file)")
            # the one reader (16-bit scaled, alpha composited, bombs refused), re-encoded as PNG: one format on the
            # card, no EXIF (may hold paths/GPS)
            name, image = path.name, load_image(path)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._") or "image"
        name, i = f"{stem}.png", 1
        while name in taken:
            name, i = f"{stem}_{i}.png", i + 1
        taken.add(name)
        (folder / IMAGES_SUBFOLDER).mkdir(exist_ok=True)
        image.save(folder / IMAGES_SUBFOLDER / name)
        staged.append(Path(IMAGES_SUBFOLDER) / name)
    return staged


def stage_folder(vae, folder: str | os.PathLike, *, repo_id: str, ema_vae=None, metrics: Any = None,
                 metrics_model: str | None = None, images: Sequence = (), training_args: Any = None,
                 base_model: str | None = None, datasets: str | Sequence[str] | None = None,
                 license: str = DEFAULT_LICENSE, single_file: bool | None = None) -> Path:
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
    folder = check_output_folder(folder, "staging folder")
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"staging folder {os.fspath(folder)!r} is not empty; pass a new or empty folder")
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id or ""):
        raise ValueError(f"repo_id must look like 'user/name' or 'name', got {repo_id!r}")
    if not isinstance(license, str) or not LICENSE_ID.fullmatch(license):
        raise ValueError(f"license must be a Hub license id such as 'apache-2.0', 'openrail++' or 'other', got {license!r}")
    with writing(folder):  # a full disk: "disk full while writing <folder>", as every command says it
        folder.mkdir(parents=True, exist_ok=True)
        if ema_vae is not None:
            _check_ema(vae, ema_vae)
        save_model_folder(vae, folder, ema=ema_vae)
        update_config(folder / CONFIG_NAME, {}, remove=("_name_or_path",))  # from_pretrained's local path: not published
        single_file_name = None
        if single_file or (single_file is None and single_file_tools(vae.config)):
            single_file_name = f"{repo_id.split('/')[-1]}.safetensors"
            _as_klvae(vae).save_single_file(folder / single_file_name)
        staged_images = _stage_images(images or (), folder)
        card = render_model_card(
            vae, repo_id=repo_id, metrics=metrics, metrics_model=metrics_model, images=staged_images,
            training_args=training_args, base_model=base_model, datasets=datasets, license=license,
            single_file_name=single_file_name, has_ema=ema_vae is not None,
        )
        card.save(folder / CARD_NAME)
    return folder


# ----------------------------------------------------------------------------------------------- upload
def publish(vae, repo_id: str, *, folder: str | os.PathLike | None = None, metrics: Any = None,
            images: Sequence | None = None, training_args: Any = None, base_model: str | None = None,
            datasets: str | Sequence[str] | None = None, license: str = DEFAULT_LICENSE, private: bool = False,
            token: str | None = None, commit_message: str = DEFAULT_COMMIT_MESSAGE, ema_vae=None,
            metrics_model: str | None = None, api=None) -> str:
    """Stage, validate and upload a VAE as one Hub commit; returns the commit URL.

    Args:
        vae (`KLVAE` or `AutoencoderKL`): the model to publish (its weights go to the repo root).
        repo_id (`str`): ``"user/name"`` (or ``"name"`` for your own namespace).
        folder (path, *optional*, defaults to `None`): staging folder (must be empty); `None` uses a temporary one,
            deleted afterwards.
        metrics, metrics_model, images, training_args, base_model, datasets, license, ema_vae: as in `stage_folder`.
        private (`bool`, *optional*, defaults to `False`): create the repo private.
        token (`str`, *optional*, defaults to `None`): Hub token; `None` uses huggingface_hub's sources (``HF_TOKEN``,
            the ``hf auth login`` cache). It is only handed to the API calls, never written.
        commit_message (`str`, *optional*): the commit's message.
        api (`huggingface_hub.HfApi`, *optional*, defaults to `None`): the client to use (tests pass a stand-in).

    Returns:
        `str`: the URL of the commit.

    Raises:
        `ValueError`: the staged folder failed validation; nothing was uploaded.
    """
    with tempfile.TemporaryDirectory(prefix="klvae-push-") as tmp:
        staged = _stage_and_validate(
            vae, Path(folder) if folder is not None else Path(tmp) / "repo", repo_id=repo_id, token=token,
            ema_vae=ema_vae, metrics=metrics, metrics_model=metrics_model, images=images, training_args=training_args,
            base_model=base_model, datasets=datasets, license=license,
        )
        return upload_staged(staged, repo_id, private=private, token=token, commit_message=commit_message, api=api)


def _stage_and_validate(vae, folder: Path, *, repo_id: str, token: str | None = None, **options) -> Path:
    """``stage_folder`` then ``validate_folder``. If either fails, a folder that was absent or empty is left so (no
    half-staged weights remain, and the same command can run again); a non-empty one is refused untouched."""
    existed = folder.exists()
    ours = not existed or (folder.is_dir() and not any(folder.iterdir()))  # then everything in it is staged by us
    try:
        stage_folder(vae, folder, repo_id=repo_id, **options)
        validate_folder(folder, token=token)
    except BaseException:
        if ours:
            shutil.rmtree(folder, ignore_errors=True)
            if existed:
                folder.mkdir(exist_ok=True)
        raise
    return folder


def upload_staged(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                  commit_message: str = DEFAULT_COMMIT_MESSAGE, api=None, **upload_options) -> str:
    """``create_repo(exist_ok=True)`` + one ``upload_folder`` commit of a folder; returns the commit URL.
    ``upload_options``: more ``upload_folder`` arguments (``path_in_repo``, ``ignore_patterns``)."""
    api = api if api is not None else huggingface_hub.HfApi()
    repo_url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id  # "name" resolves to "user/name"
    commit = api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), repo_type="model", token=token,
                               commit_message=commit_message, **upload_options)
    logger.info("uploaded %s to %s", os.fspath(folder), commit.commit_url)
    return commit.commit_url


def push_checkpoint_async(checkpoint_dir: str | os.PathLike, repo_id: str, *, path_in_repo: str | None = None,
                          token: str | None = None, private: bool = True, commit_message: str | None = None,
                          ignore_patterns: Sequence[str] | None = None, api=None) -> Future:
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
    api = api if api is not None else huggingface_hub.HfApi()
    snapshot = Path(tempfile.mkdtemp(prefix="klvae-ckpt-")) / source.name
    shutil.copytree(source, snapshot)
    path_in_repo = path_in_repo if path_in_repo is not None else f"checkpoints/{source.name}"
    message = commit_message or f"Checkpoint {source.name}"

    def push() -> str:
        try:
            return upload_staged(snapshot, repo_id, private=private, token=token, commit_message=message, api=api,
                                 path_in_repo=path_in_repo, ignore_patterns=list(ignore_patterns or []) or None)
        finally:
            shutil.rmtree(snapshot.parent, ignore_errors=True)

    return api.run_as_future(push)


# ----------------------------------------------------------------------------------------------- command line
def _parser() -> OneLineParser:
    parser = OneLineParser(
        prog="klvae-push",
        description="Publish a trained VAE to the Hugging Face Hub (weights, single file, images, model card). "
        "The token comes from HF_TOKEN or `hf auth login`; it is never written anywhere.",
    )
    parser.add_argument("model_dir", type=Path, help="diffusers-format VAE folder (or pipeline folder / .safetensors)")
    parser.add_argument("--repo-id", required=True, help="Hub repo, 'user/name'")
    parser.add_argument("--metrics", type=Path, help="metrics.json written by klvae-eval --output")
    parser.add_argument("--metrics-model", help="this model's name in a multi-model metrics file (default: the row whose path is MODEL_DIR, else the only local path, else the first)")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``klvae-push``; a user error is one line on stderr and exit status 2."""
    return run_command(_parser(), _run, argv)


def _run(args) -> int:
    dtype = stored_dtype(args.model_dir)  # publish the weights as stored: an fp16 folder stays fp16
    vae = load_vae(args.model_dir, dtype=dtype)
    with_ema = not args.no_ema and has_variant(args.model_dir, EMA_VARIANT)
    metrics_model = args.metrics_model
    if not metrics_model and args.metrics is not None:  # klvae-eval names a local model by its path: MODEL_DIR's row
        metrics_model = next((r.model for r in load_metrics(args.metrics) if same_path(r.model, args.model_dir)), None)
    options = dict(
        ema_vae=load_vae(args.model_dir, variant=EMA_VARIANT, dtype=dtype) if with_ema else None, metrics=args.metrics,
        metrics_model=metrics_model, images=args.images,
        training_args=args.training_args, base_model=args.base_model, datasets=args.dataset, license=args.license,
    )
    if args.dry_run:
        folder = args.folder or Path(tempfile.mkdtemp(prefix="klvae-push-")) / "repo"
        try:
            _stage_and_validate(vae, folder, repo_id=args.repo_id, **options)
        except BaseException:
            if args.folder is None:  # a failed dry run leaves no temporary copy of the weights behind
                shutil.rmtree(folder.parent, ignore_errors=True)
            raise
        print(f"dry run: would upload {folder} to https://huggingface.co/{args.repo_id} (nothing uploaded)")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            print(f"  {path.relative_to(folder).as_posix():<48} {path.stat().st_size / 1e6:9.2f} MB")
        return 0
    print(publish(vae, args.repo_id, folder=args.folder, private=args.private, commit_message=args.commit_message,
                  **options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
