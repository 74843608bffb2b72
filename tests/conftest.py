from pathlib import Path

import pytest
import torch

from diffusers_klvae import KLVAE

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "photos"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # tiny models on shared cores: idle intra-op threads spin-wait and make each op 10-20x slower
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed_all():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def photo_paths(photos_dir) -> list[Path]:
    return sorted(photos_dir.glob("*.jpg"))


@pytest.fixture(scope="module")
def tiny_vae():
    """The ``tiny`` preset (f2, 8/16 channels), seeded, in eval mode: one per test module."""
    torch.manual_seed(0)
    return KLVAE.from_preset("tiny").eval()


def perturb_norms_and_biases(model, *, gain_std: float, bias_std: float):
    """Non-trivial GroupNorm gains (1 + gain_std·N(0,1)) and biases (bias_std·N(0,1)) from the global RNG, so that
    paths which treat norms or biases specially are exercised; returns the model."""
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.data = 1 + gain_std * torch.randn_like(p)
        elif name.endswith("bias"):
            p.data = bias_std * torch.randn_like(p)
    return model
