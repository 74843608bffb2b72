"""Files in and out for the ``klvae`` subcommands: image arguments, latents files, output paths. Every failure is a
``ValueError``/``OSError`` that ``klvae`` prints as one line (exit status 2).
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

from .cli_support import check_finite, check_output_folder, writing
from .imaging import UnreadableImage, list_image_paths, load_image, resize_and_crop, to_pil, to_tensor
from .latent_masks import downsampling_factor
from .latents import unscale_latents

logger = logging.getLogger("diffusers_klvae.cli")  # the messages users see from `klvae`
SCALING_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")  # what latents.scale_latents reads


def find_images(paths) -> list[str]:
    """Image arguments (files, or folders: their image files, sorted) -> the files, unread."""
    found = []
    for arg in paths:
        if os.path.isdir(arg):
            found += list_image_paths(arg)
        elif not os.path.lexists(arg):  # a dangling symlink exists as a path: the reader names it
            raise FileNotFoundError(f"no such image: {arg!r}")
        else:
            found.append(arg)
    if not found:
        raise ValueError(f"no image files found in {', '.join(map(repr, map(os.fspath, paths)))}")
    return found


def load_images(paths, resolution: int | None, vae, *, skip_unreadable: bool = True):
    """Image arguments (a folder: its image files, sorted) -> (kept paths, list of [-1, 1] tensors (3, H, W)); sizes
    must be multiples of the model's downsampling factor unless resized.

    An image the reader refuses is skipped with a warning naming it and the reason (``skip_unreadable=False``:
    it raises); none readable raises ``ValueError``.
    """
    factor = downsampling_factor(vae)
    if resolution and resolution % factor:
        raise ValueError(f"--resolution {resolution} is not a multiple of the model's downsampling factor {factor}")
    kept, images, skipped = [], [], []
    for path in find_images(paths):
        try:
            img = load_image(path)
        except UnreadableImage as err:
            if not skip_unreadable:
                raise
            skipped.append(err)
            logger.warning("skipped %s", err)
            continue
        if resolution:
            img = resize_and_crop(img, resolution)
        elif img.width % factor or img.height % factor:
            raise ValueError(f"image {path!r} is {img.width}x{img.height}, not a multiple of {factor}: pass --resolution")
        kept.append(path)
        images.append(to_tensor(img))
    if not images:
        raise ValueError(f"no readable image among {len(skipped)} given: " + "; ".join(str(e) for e in skipped))
    if skipped:
        logger.warning("skipped %d of %d images (%s)", len(skipped), len(skipped) + len(images), ", ".join(sorted({e.reason for e in skipped})))
    return kept, images


def check_not_inputs(outputs, inputs) -> None:
    """Refuse, before any work, an output that is one of the input files (the same file: through a symbolic or hard
    link, ``..``) or that two outputs share: writing it would replace an original, or one result by another."""
    seen = {}
    for out in outputs:
        if seen.setdefault(os.path.realpath(out), out) is not out:
            raise ValueError(f"output {os.fspath(out)!r} would be written twice (also as "
                             f"{os.fspath(seen[os.path.realpath(out)])!r}): expected distinct outputs")
    originals = {_file_id(p): p for p in inputs if _file_id(p)}
    for out in outputs:
        if _file_id(out) in originals:
            raise ValueError(f"output {os.fspath(out)!r} is the input {os.fspath(originals[_file_id(out)])!r}: it would be "
                             "overwritten; expected an output path that is not an input")


def check_new_files(paths, out: str) -> None:
    """Refuse output files that exist already: a folder output's names come from the inputs' names, so an existing
    one may be an original image (a reconstruct or decode into the photos' own folder), not an earlier result."""
    existing = [p for p in paths if os.path.lexists(p)]
    if existing:
        raise ValueError(f"--out {out!r} already holds {existing[0].name} (klvae never replaces a file there, which may "
                         "be an original image): expected a new or empty folder")


def _file_id(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # not there (yet)
        return None
    return st.st_dev, st.st_ino


def save_image(image, path: Path) -> None:
    """[-1, 1] tensor (3, H, W) -> PNG at ``path`` (a full disk is named)."""
    with writing(path):
        to_pil(image).save(path)


def stack_same_size(images):
    sizes = {tuple(x.shape[-2:]) for x in images}
    if len(sizes) > 1:
        raise ValueError(f"images differ in size ({', '.join(f'{w}x{h}' for h, w in sorted(sizes))}): pass --resolution")
    return torch.stack(images)


def seeded_generator(seed: int | None):
    return None if seed is None else torch.Generator().manual_seed(seed)


def output_stems(names) -> list[str]:
    """One output file stem per input: its own, or all numbered (``0003-x``) when two inputs share one (a/x.jpg, b/x.png),
    so that no output replaces another."""
    stems = [Path(name).stem for name in names]
    if len(set(stems)) == len(stems) and all(stem.strip(".") for stem in stems):
        return stems
    logger.warning("inputs share file names (or have none, like '..png'): outputs are numbered in input order")
    return [f"{i:04d}" + (f"-{stem}" if stem.strip(".") else "") for i, stem in enumerate(stems)]


@contextmanager
def output_dir(out: Path, flag: str):
    """Create the output folder for the ``with`` block, checked again (the model loaded since the first check; a full
    disk is named); a block that fails before writing into a folder it created removes it: nothing is left behind."""
    check_output_folder(out, flag)
    created = not out.exists()
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def check_output_file(path: str, suffix: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != suffix:
        raise ValueError(f"output {path!r} must end in {suffix}")
    if out.is_dir():
        raise ValueError(f"output {path!r} is a folder")
    with writing(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    return out


def read_latents(path: str, key: str):
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no such latents file: {path!r}")
    if not os.path.isfile(path):  # a folder, FIFO, device or dangling symlink: safetensors would block or fail obscurely
        raise ValueError(f"latents {path!r} is not a regular file: expected a .safetensors file")
    try:
        with safe_open(path, framework="pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
            tensor = f.get_tensor(key) if key in keys else None
    except Exception as err:  # safetensors raises its own error type for a non-safetensors file
        raise ValueError(f"cannot read {path!r} as safetensors: {err}") from err
    if tensor is None:
        raise ValueError(f"{path!r} has no tensor {key!r} (has: {', '.join(keys)})")
    return tensor, metadata


def _recorded_scaling(vae, metadata: dict, path: str) -> SimpleNamespace:
    """The scaling the file's latents were made with: its metadata, else the model's config. A recorded value wins
    (with a warning): the config may have been refitted since, and a wrong factor gives wrong images silently."""
    scaling = {key: getattr(vae.config, key, None) for key in SCALING_KEYS}
    channels = vae.config.latent_channels
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    for key in SCALING_KEYS:
        if key not in metadata:
            continue
        try:
            value = json.loads(metadata[key])
        except ValueError:
            value = metadata[key]
        if key == "scaling_factor":
            ok = number(value) and value != 0
        else:
            ok = value is None or number(value) or (isinstance(value, list) and len(value) == channels and all(map(number, value)))
        if not ok:
            expected = "a finite non-zero number" if key == "scaling_factor" else f"null, a finite number or {channels} of them"
            raise ValueError(f"{path!r}: metadata {key!r} is {metadata[key][:60]!r}: expected {expected}")
        if value != (list(scaling[key]) if isinstance(scaling[key], tuple) else scaling[key]):
            logger.warning("%s: latents scaled with %s %s (recorded in the file), the model's config has %s: using the file's",
                           path, key, value, scaling[key])
        scaling[key] = value
    return SimpleNamespace(**scaling)


def raw_latents(vae, latents, metadata: dict, space: str | None, path: str):
    """A latents file's tensor -> raw latents (B, C, h, w), float32: diffusion-space latents are unscaled with the
    scaling the file records (see :func:`_recorded_scaling`)."""
    space = space or metadata.get("space", "raw")
    if latents.ndim == 3:
        latents = latents[None]
    channels = vae.config.latent_channels
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit this model: expected (B, {channels}, h, w)")
    check_finite(latents, "the latents")
    if space != "diffusion":
        return latents.float()
    scaling = _recorded_scaling(vae, metadata, path)
    raw = unscale_latents(SimpleNamespace(config=scaling), latents.float())  # unscale_latents reads only vae.config
    check_finite(raw, f"the latents unscaled with scaling_factor {scaling.scaling_factor}, shift_factor {scaling.shift_factor}")
    return raw


def output_names(metadata: dict, count: int, path: str) -> list[str]:
    """Names for a latents file's ``count`` images: the encoded files' names from its ``files`` metadata (a JSON list of
    strings, as ``klvae encode`` writes), else numbered (0000, 0001...), with a warning when ``files`` is unusable."""
    numbered = [f"{i:04d}" for i in range(count)]
    if "files" not in metadata:
        return numbered
    try:
        names = json.loads(metadata["files"])
    except ValueError:
        names = None
    if not (isinstance(names, list) and len(names) == count and all(isinstance(n, str) and Path(n).stem for n in names)):
        logger.warning("%s: metadata 'files' is %r, expected a JSON list of %d file names: numbering the images instead",
                       path, metadata["files"][:60], count)
        return numbered
    return names
