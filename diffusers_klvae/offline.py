"""Shared by the LPIPS and FID loaders: is a weights host reachable, and where torch hub caches a download."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

PROBE_TIMEOUT_S = 3.0  # an offline machine must fall through to the offline package files quickly, not hang


def host_reachable(url: str) -> bool:
    """True when the host of ``url`` accepts a TCP connection on 443 within ``PROBE_TIMEOUT_S``."""
    try:
        socket.create_connection((urlparse(url).hostname, 443), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def hub_cache_file(url: str) -> Path:
    """The file ``torch.hub.load_state_dict_from_url(url)`` reads from or writes to."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
