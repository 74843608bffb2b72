"""``KLVAE.from_single_file`` / ``save_single_file``: original LDM/CompVis VAE files in and out, with the arguments of
diffusers' ``AutoencoderKL.from_single_file`` (``FromOriginalModelMixin``). The key layout and the file reading are
``single_file.py``'s; this module resolves the config and checks what may be written.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from .presets import list_presets, preset_config
from .single_file import checkpoint_state_dict, load_single_file_into, single_file_mismatches, write_ldm_file


class SingleFileMixin:
    """``from_single_file`` / ``save_single_file`` for a ``ModelMixin`` with KLVAE's config (diffusers'
    ``FromOriginalModelMixin`` arguments)."""

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        config: dict | str | os.PathLike | None = None,
        *,
        subfolder: str | None = None,
        original_config: dict | str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        force_download: bool = False,
        proxies: dict | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
        config_revision: str | None = None,
        disable_mmap: bool = False,
        low_cpu_mem_usage: bool | None = None,
        **kwargs,
    ) -> SingleFileMixin:
        r"""
        Load an original LDM/CompVis VAE checkpoint (keys with ``first_stage_model.``, ``vae.`` or no prefix; diffusers
        keys work too), with the arguments of diffusers' ``AutoencoderKL.from_single_file``, and return the same model
        (``eval()`` mode).

        Args:
            pretrained_model_link_or_path_or_dict (`str`, `os.PathLike` or `dict`): a local ``.safetensors``/``.ckpt``
                file, a Hub file URL (``https://huggingface.co/<repo>/blob/main/<file>``), or a state dict.
            config (`str`, `os.PathLike` or `dict`, *optional*, defaults to `None`): a Hub repo id or local diffusers
                folder (with ``subfolder``), a ``config.json`` path, a preset name or a config dict. `None`: the
                ``"sd-kl-f8"`` preset (diffusers instead fetches the config of the model it infers from the keys,
                which for a VAE-only file is the same SD 1.x config).
            subfolder (`str`, *optional*, defaults to `None`): where ``config.json`` sits in the repo or folder.
            original_config (`str` or `dict`, *optional*, defaults to `None`): an LDM YAML (path, URL or dict) to build
                the config from, as in diffusers; excludes ``config``.
            torch_dtype (`torch.dtype`, *optional*, defaults to `None`): dtype of the returned model (``dtype=`` too).
            device (`str` or `torch.device`, *optional*, defaults to `None`): device of the returned model.
            force_download, proxies, token, cache_dir, local_files_only, revision, config_revision, disable_mmap:
                Hub download options, as in diffusers (``revision`` is the checkpoint's, ``config_revision`` the
                config's).
            low_cpu_mem_usage (`bool`, *optional*): accepted for diffusers compatibility; the checkpoint is loaded
                into an initialised model either way.
            kwargs: config overrides (e.g. ``scaling_factor=0.13025``); ``dtype`` is an alias of ``torch_dtype``.
        """
        torch_dtype = kwargs.pop("dtype", None) or torch_dtype
        unknown = sorted(set(kwargs) - set(inspect.signature(cls.__init__).parameters))
        if unknown:
            raise TypeError(f"from_single_file got unexpected arguments {unknown}; config overrides must be KLVAE "
                            "config keys")
        if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
            raise TypeError(f"torch_dtype must be a torch.dtype, e.g. torch.float16; got {torch_dtype!r}")
        hub = dict(force_download=force_download, proxies=proxies, token=token, cache_dir=cache_dir,
                   local_files_only=local_files_only)
        state = checkpoint_state_dict(pretrained_model_link_or_path_or_dict, revision=revision,
                                      disable_mmap=disable_mmap, **hub)
        if original_config is not None:
            if config is not None:
                raise ValueError("pass either config= or original_config=, not both")
            from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm, fetch_original_config

            if isinstance(original_config, str):  # a path or URL of an LDM YAML
                original_config = fetch_original_config(original_config, local_files_only=bool(local_files_only))
            config_dict = create_vae_diffusers_config_from_ldm(original_config, state)
        else:
            config_dict = _resolve_config(cls, config, subfolder=subfolder, revision=config_revision, **hub)
        model = cls.from_config({**config_dict, **kwargs})
        source = pretrained_model_link_or_path_or_dict
        load_single_file_into(model, state,
                              source="the state dict" if isinstance(source, dict) else repr(os.fspath(source)))
        placement = {k: v for k, v in (("device", device), ("dtype", torch_dtype)) if v is not None}  # a dtype=None
        return model.to(**placement).eval()  # would still make diffusers warn about float32 modules

    def save_single_file(self, path: str | os.PathLike, force: bool = False) -> None:
        """Write the original LDM layout (no prefix, 1×1-conv attention, ``.safetensors``) for ComfyUI / A1111.

        Those loaders ignore any config and build the SD KL-f8 architecture (ComfyUI also its 16-channel variant
        without quant convs), so a file of another architecture would fail to load or, worse, load and decode wrong.
        The SD/SDXL architecture is therefore required (``single_file_mismatches`` lists what differs).

        Args:
            path (`str` or `os.PathLike`): the ``.safetensors`` file to write.
            force (`bool`, *optional*, defaults to `False`): write any architecture, for tools that read a config
                beside the file (``KLVAE.from_single_file(path, config=...)`` does).
        """
        mismatches = single_file_mismatches(self.config)
        if mismatches and not force:
            differing = ", ".join(f"{key}={value!r} (needs {want!r})" for key, (value, want) in mismatches.items())
            raise ValueError(f"ComfyUI/A1111 load single files as the SD KL-f8 architecture, and this config differs: "
                             f"{differing}; use save_pretrained, or force=True for tools that read its config")
        write_ldm_file(self, path)


def _resolve_config(cls, config: dict | str | os.PathLike | None, *, subfolder: str | None = None, **hub) -> dict[str, Any]:
    """``from_single_file``'s ``config``: None (the SD preset), a dict, a preset name, a local folder or config.json,
    or a Hub repo id (``subfolder`` and Hub options as in ``ConfigMixin.load_config``) → a config dict."""
    if isinstance(config, dict):
        return dict(config)
    if config is None or str(config) in list_presets():
        return preset_config("sd-kl-f8" if config is None else str(config))
    path = os.fspath(config)
    if os.path.isfile(path):  # a config.json itself
        path, subfolder = os.path.dirname(path) or ".", None
    try:
        return dict(cls.load_config(path, subfolder=subfolder, **hub))
    except (OSError, ValueError) as err:
        raise ValueError(f"config {config!r} is neither a dict, a preset ({', '.join(list_presets())}), a diffusers "
                         f"folder nor a Hub repo with a config.json{f' in {subfolder!r}' if subfolder else ''}: {err}") from err

