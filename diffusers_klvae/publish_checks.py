"""What may be published: training arguments without secrets (`sanitize_training_args`), and the checks a staged
folder must pass before anything is uploaded (`validate_folder`: weights, config, card metadata; no token, secret or
local path in any text file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

from .loading import CONFIG_NAME, WEIGHTS_NAME

SECRET_WORDS = ("token", "secret", "password", "passwd", "api_key", "apikey", "credential")
HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
REPO_ID = re.compile(r"([\w.-]+/)?[\w.-]+")  # "user/name" or "name"
LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")  # the Hub's license ids: "apache-2.0", "openrail++", "other"
_WINDOWS_ABS_RE = re.compile(r"^[A-Za-z]:[\\/]")
# an absolute path inside a longer text ("backbone (/root/.cache/...)"), not a URL's "//" nor a Hub id's "org/name"
_EMBEDDED_PATH_RE = re.compile(r"(?:^|[\s(\[=,'\"])(?:/|~/|[A-Za-z]:[\\/])[\w.~-]")
_MIN_ENV_VALUE_LEN = 8  # shorter environment values ("1", "true", "fp16") are too common to mean anything
_TEXT_SUFFIXES = {".md", ".json", ".txt", ".yaml", ".yml"}
_DROP = object()  # marks a value _scrub removes
CARD_NAME = "README.md"


def is_local_path(value: str) -> bool:
    return value.startswith(("/", "~", "file:")) or bool(_WINDOWS_ABS_RE.match(value))


def leaks(value: str, env_values: Sequence[str] | None = None) -> bool:
    """True if a string is or contains an absolute local path, looks like a Hub token, or contains one of
    ``env_values`` (default: this process's environment values of 8 characters or more)."""
    env_values = _env_values() if env_values is None else env_values
    return (is_local_path(value) or bool(_EMBEDDED_PATH_RE.search(value)) or bool(HF_TOKEN_RE.search(value))
            or any(env in value for env in env_values))


def _env_values() -> list[str]:
    return [v for v in os.environ.values() if len(v) >= _MIN_ENV_VALUE_LEN]


def read_json(path: Path, *, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {os.fspath(path)!r} (expected a JSON file)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {os.fspath(path)!r} is not valid JSON: {err}") from err


def plain(value: Any) -> Any:
    """Dataclass / Namespace / Path / dtype -> JSON-like Python values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, argparse.Namespace):
        return plain(vars(value))
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # Path, torch.dtype, enums


def flatten(args: Mapping, prefix: str = "") -> dict:
    """{"loss": {"kl_weight": 1e-6}} -> {"loss.kl_weight": 1e-6}"""
    flat = {}
    for key, value in args.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
        training_args = read_json(Path(training_args), what="training arguments")
    args = plain(training_args)
    if not isinstance(args, dict):
        raise ValueError(f"training arguments must be a mapping, got {type(training_args).__name__}")
    return _scrub(args, _env_values())


def _scrub(value: Any, env_values: Sequence[str]) -> Any:
    """Recursive worker of `sanitize_training_args`; returns `_DROP` for values that must go."""
    if isinstance(value, dict):
        kept = {key: _scrub(item, env_values) for key, item in value.items()
                if not any(word in key.lower() for word in SECRET_WORDS)}
        return {key: item for key, item in kept.items() if item is not _DROP}
    if isinstance(value, list):
        return [item for item in (_scrub(v, env_values) for v in value) if item is not _DROP]
    return _DROP if isinstance(value, str) and leaks(value, env_values) else value


def _local_markers(folder: Path) -> list[re.Pattern]:
    """Local paths not to publish, as whole paths (so that ``/data`` does not match the dataset ``someone/data``)."""
    paths = {os.fspath(folder.resolve()), os.fspath(Path.cwd()), tempfile.gettempdir(), os.fspath(Path.home())}
    paths = sorted(p.rstrip("/\\") for p in paths if len(p.rstrip("/\\")) > 1)
    return [re.compile(r"(?<![\w.~-])" + re.escape(p) + r"(?![\w.-])") for p in paths]


def _leak_problems(folder: Path, token: str | None) -> list[str]:
    """Every text file of a staged folder that holds an access token (or ``token``) or a local absolute path."""
    problems, markers = [], _local_markers(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES):
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(folder).as_posix()
        if (token and token in text) or HF_TOKEN_RE.search(text):
            problems.append(f"{rel} contains an access token")
        found = (m.search(text) for m in markers)
        problems += [f"{rel} contains the local path {f[0]!r}" for f in found if f]
    return problems


# ----------------------------------------------------------------------------------------------- validation
def validate_folder(folder: str | os.PathLike, *, token: str | None = None) -> None:
    """Check a staged folder before anything is uploaded; raises ``ValueError`` listing every problem.

    Args:
        folder (path): the staged folder.
        token (`str`, *optional*, defaults to `None`): the token about to be used; it must not appear in any file.

    Checks: ``config.json`` (a diffusers config with ``_class_name``) and ``diffusion_pytorch_model.safetensors``
    at the root; every ``.safetensors`` readable, non-empty and finite (single file and ``ema`` variant included);
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
                bad = sum(int((~torch.isfinite(f.get_tensor(key))).sum()) for key in f.keys())
                if bad:  # a diverged run: every image it decodes would be black
                    problems.append(f"{rel} holds {bad} NaN/Inf weights")
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            problems.append(f"{rel} is not a readable safetensors file: {err}")
    return problems


def _card_problems(folder: Path) -> list[str]:
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
