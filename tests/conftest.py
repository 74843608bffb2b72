from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "photos"


@pytest.fixture(autouse=True)
def seed_all():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def photo_paths(photos_dir) -> list[Path]:
    return sorted(photos_dir.glob("*.jpg"))
