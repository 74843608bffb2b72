"""The one model loader of every tool (``klvae``, ``klvae-eval``, ``klvae-stats``, ``klvae-push``, training): a spec
(a model in memory, a diffusers or pipeline folder, an original-layout single file or its Hub URL, a preset name, a
Hub id ``org/name[/subfolder]``) -> a `KLVAE`; and the one layout of a model folder it reads (``save_model_folder``:
raw weights + the EMA as the ``ema`` variant).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from . import KLVAE
from .cli_support import writing
from .models.presets import list_presets, preset_config

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# EMA weights are the "ema" variant beside the main weights, not an ema/ subfolder (whose local from_pretrained loads
# the root weights): see docs/publishing.md.
EMA_VARIANT = "ema"
EMA_WEIGHTS_NAME = f"diffusion_pytorch_model.{EMA_VARIANT}.safetensors"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def load_vae(spec: str | os.PathLike | nn.Module, *, variant: str | None = None, subfolder: str | None = None,
             revision: str | None = None, dtype: torch.dtype | str | None = None) -> nn.Module:
    """A model spec (this module's docstring) -> a VAE; a module is returned as is (cast to ``dtype`` if given).

    Args:
        spec: a module, folder, pipeline folder, single file or Hub file URL, preset name or Hub id.
        variant (`str`, *optional*): a weights variant, e.g. ``EMA_VARIANT``; a local folder must hold it.
        subfolder (`str`, *optional*): where ``config.json`` sits; `None` finds a pipeline folder's ``vae/``.
        revision (`str`, *optional*): a Hub revision (branch, tag or commit).
        dtype (`torch.dtype` or its name, *optional*): the dtype of the returned model.

    Raises:
        `FileNotFoundError`: a local folder lacks the ``variant`` weights.
        `ValueError`: anything else that cannot load, in one line saying what was tried.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if isinstance(spec, nn.Module):
        return _cast(spec, dtype)
    spec = os.fspath(spec)
    kind, where, subfolder = _locate(spec, subfolder)
    if kind == "folder":
        if variant is not None and not has_variant(where, variant, subfolder=subfolder):
            raise FileNotFoundError(f"no {variant!r} weights in {spec!r}: expected "
                                    f"diffusion_pytorch_model.{variant}.safetensors beside config.json")
        weights = where / (subfolder or "")
        read_model_config(weights / CONFIG_NAME)  # else diffusers tries the Hub and blames the network
        stored = (WEIGHTS_NAME, f"{WEIGHTS_NAME}.index.json", "diffusion_pytorch_model.bin")  # one file, shards, pickle
        if variant is None and not any((weights / name).is_file() for name in stored):
            raise ValueError(f"folder {os.fspath(weights)!r} has config.json but no weights: expected {WEIGHTS_NAME}")
    elif variant is not None and (kind == "file" or spec.endswith(SINGLE_FILE_SUFFIXES)):
        raise ValueError(f"a single file has no weights variants; got variant={variant!r} for {spec!r}")
    try:
        if kind in ("folder", "hub"):
            return KLVAE.from_pretrained(where, subfolder=subfolder, variant=variant, revision=revision, torch_dtype=dtype)
        if kind == "file":
            return KLVAE.from_single_file(where, revision=revision, torch_dtype=dtype)
        if kind == "preset":
            logger.warning("model %r is a preset: randomly initialised weights, not a trained model", spec)
            return _cast(KLVAE.from_preset(spec), dtype)
    except Exception as err:  # noqa: BLE001 - loaders raise OSError, EnvironmentError, RuntimeError...; all mean "cannot load"
        local = spec.split("/")[0]  # "outputs/my-run" with outputs/ here: most likely a mistyped path, not a repo
        hint = f"no such local folder (though {local!r} is one here), and as a Hub id: " if kind == "hub" and \
            Path(local).is_dir() else ""
        raise ValueError(f"cannot load model {spec!r}: {hint}{type(err).__name__}: {err}") from err
    raise _unknown(spec)


def load_vae_config(spec: str | os.PathLike, *, subfolder: str | None = None, revision: str | None = None) -> dict:
    """The config of the model ``load_vae(spec)`` loads, without reading weights (an original-layout single file:
    the KL-f8 architecture of that family). Raises as ``load_vae``."""
    spec = os.fspath(spec)
    kind, where, subfolder = _locate(spec, subfolder)
    if kind == "file":
        return preset_config("sd-kl-f8")
    if kind == "preset":
        return preset_config(spec)
    if kind is None:
        raise _unknown(spec)
    try:
        return dict(KLVAE.load_config(where, subfolder=subfolder, revision=revision))
    except Exception as err:  # noqa: BLE001 - as load_vae: a one-line "cannot load"
        raise ValueError(f"cannot load model {spec!r}: {type(err).__name__}: {err}") from err


def _locate(spec: str, subfolder: str | None):
    """A spec -> ``(kind, where, subfolder)``; kind: "folder", "file" (local or a Hub URL), "preset", "hub" or None."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder", path, subfolder if subfolder is not None else _model_subfolder(path)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:  # e.g. an image given as --model: not a pickle error
            raise ValueError(f"cannot load model {spec!r}: a file that is not a model; expected a single file "
                             f"({', '.join(SINGLE_FILE_SUFFIXES)}), a model folder, a preset or a Hub id")
        return "file", path, None
    if spec.startswith("https://") and spec.endswith(SINGLE_FILE_SUFFIXES):
        return "file", spec, None
    if spec in list_presets():
        return "preset", spec, None
    if path.exists():  # a FIFO, a socket...
        raise ValueError(f"cannot load model {spec!r}: not a folder or a regular file")
    if looks_like_hub_id(spec):
        parts = spec.split("/")  # org/name[/subfolder], e.g. a pipeline repo's "vae"
        return "hub", "/".join(parts[:2]), subfolder or "/".join(parts[2:]) or None
    return None, spec, subfolder


def _unknown(spec: str) -> ValueError:
    return ValueError(f"cannot load model {spec!r}: not an existing folder or file, not a preset "
                      f"({', '.join(list_presets())}) and not a Hub id (org/name)")


@contextmanager
def ema_weights(ema, model):
    """diffusers' ``EMAModel`` weights are in ``model`` inside the block, the raw ones again after it (`None`: no
    change)."""
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        if ema is not None:
            ema.restore(model.parameters())


def save_model_folder(vae: nn.Module, folder: str | os.PathLike, *, ema=None) -> None:
    """The one layout of a model folder (a training run's output, every checkpoint's ``vae/``, a staged Hub repo):
    ``save_pretrained`` (safetensors) of ``vae`` and, beside it, the EMA weights as the ``ema`` variant
    (``EMA_WEIGHTS_NAME``: ``AutoencoderKL.from_pretrained(folder, variant="ema")``).

    Args:
        vae (`KLVAE` or `AutoencoderKL`): the raw weights; its config is the folder's ``config.json``.
        folder (path): where to save.
        ema (*optional*, defaults to `None`): diffusers' ``EMAModel`` of ``vae``'s parameters, or a model of ``vae``'s
            config. `None` removes an older EMA file (a run resumed without EMA must not leave one beside new weights).
    """
    if ema is not None and not hasattr(ema, "shadow_params"):
        ema.save_pretrained(folder, safe_serialization=True, variant=EMA_VARIANT)  # first: config.json is vae's
    vae.save_pretrained(folder, safe_serialization=True)
    if ema is None:
        (Path(folder) / EMA_WEIGHTS_NAME).unlink(missing_ok=True)
    elif hasattr(ema, "shadow_params"):
        with ema_weights(ema, vae):
            vae.save_pretrained(folder, safe_serialization=True, variant=EMA_VARIANT)


def has_variant(model: str | os.PathLike, variant: str = EMA_VARIANT, *, subfolder: str | None = None) -> bool:
    """Whether a local model folder (or a pipeline folder's ``vae/``) holds the ``variant`` weights."""
    model = Path(model).expanduser()
    if not model.is_dir():
        return False
    subfolder = subfolder if subfolder is not None else _model_subfolder(model)
    return (model / (subfolder or "") / f"diffusion_pytorch_model.{variant}.safetensors").is_file()


def _model_subfolder(folder: Path) -> str | None:
    """Where config.json sits: the folder itself (``None``), or ``vae`` in a pipeline folder."""
    if (folder / CONFIG_NAME).is_file():
        return None
    if (folder / "vae" / CONFIG_NAME).is_file():
        return "vae"
    raise ValueError(f"folder {os.fspath(folder)!r} has no config.json (nor vae/config.json): not a diffusers-format "
                     f"model; expected config.json + {WEIGHTS_NAME}, a pipeline folder with vae/, or a single file")


def model_config_path(model: str | os.PathLike, flag: str) -> Path:
    """The ``config.json`` of a local diffusers-format model folder (``vae/config.json`` of a pipeline folder), for a
    tool that writes into it; ``flag`` names the option that needs one."""
    folder = Path(model)
    if folder.is_dir():
        try:
            return folder / (_model_subfolder(folder) or "") / CONFIG_NAME
        except ValueError:  # no config.json there: say which option needs one
            pass
    raise ValueError(f"{flag} needs a local diffusers-format model folder with config.json, got {os.fspath(model)!r}")


def read_model_config(path: Path) -> dict:
    """A local config.json -> its dict; one that is not a JSON object is refused in one line naming it."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        config = None
    if not isinstance(config, dict):
        raise ValueError(f"{os.fspath(path)!r} is not a JSON object: expected a diffusers model config")
    return config


def update_config(config_path: Path, fields: dict, remove: tuple[str, ...] = ()) -> None:
    """Set ``fields`` in a model's config.json and drop the keys in ``remove`` (the weights are not touched); a full
    disk is named."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(fields)
    for key in remove:
        config.pop(key, None)
    with writing(config_path):
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def stored_dtype(model: str | os.PathLike) -> torch.dtype | None:
    """The dtype a local model folder's weights are stored in (``None`` for anything else), so that a tool that
    re-saves a model (``klvae-push``) keeps an fp16 folder fp16."""
    folder = Path(model).expanduser()
    try:
        file = folder / (_model_subfolder(folder) or "") / WEIGHTS_NAME
        with safe_open(file, "pt") as f:
            name = next(iter(f.keys()), None)
            return {"F16": torch.float16, "BF16": torch.bfloat16}.get(f.get_slice(name).get_dtype()) if name else None
    except Exception:  # noqa: BLE001 - not a folder of safetensors weights (the loader will say why): no dtype to keep
        return None


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return 2 <= len(parts) <= 3 and all(parts) and not spec.startswith((".", "~")) and not Path(parts[-1]).suffix


def _cast(vae: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    # diffusers' ModelMixin.to warns on every dtype cast, even a no-op one
    return vae if dtype is None or next(vae.parameters()).dtype == dtype else vae.to(dtype=dtype)
