"""A real training output → ``klvae-push --dry-run`` → loading what would be published: raw weights at the root,
EMA weights as the ``ema`` variant (the one layout, written by training and read by ``hub.load_vae``), and a
squeeze-excitation model published without a single file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_klvae import KLVAE, hub, preset_config

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "someone/tiny-run"


@pytest.fixture
def train(photos_dir, tmp_path):
    """Run ``train_autoencoder.main`` in this process (one thread, fresh Accelerate state), 2 steps with EMA."""
    sys.path.insert(0, str(ROOT))
    import train_autoencoder
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(output_dir: Path, *model_args: str) -> Path:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        train_autoencoder.main([*model_args, "--train_data_dir", str(photos_dir), "--resolution", "32",
                                "--train_batch_size", "2", "--seed", "0", "--report_to", "none",
                                "--lpips_weights", "random", "--num_validation_images", "1", "--use_ema",
                                "--max_train_steps", "2", "--output_dir", str(output_dir)])
        return output_dir

    yield run
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(threads)
    sys.path.remove(str(ROOT))


def push_dry_run(model_dir: Path, staged: Path, capsys) -> str:
    code = hub.main([str(model_dir), "--repo-id", REPO_ID, "--dry-run", "--folder", str(staged)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def assert_weights(model: KLVAE, path: Path) -> None:
    expected = load_file(path)
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("squeeze_excitation", [False, True], ids=["plain", "squeeze-excitation"])
def test_training_output_publishes_raw_and_ema_weights(train, tmp_path, capsys, squeeze_excitation):
    if squeeze_excitation:  # fine-tune an SE model: training has no SE flag, it keeps the architecture it starts from
        KLVAE(**preset_config("tiny"), encoder_squeeze_excitation=True).save_pretrained(tmp_path / "start")
        output = train(tmp_path / "out", "--pretrained_model_name_or_path", str(tmp_path / "start"))
    else:
        output = train(tmp_path / "out", "--preset", "tiny")
    raw_file, ema_file = output / hub.WEIGHTS_NAME, output / hub.EMA_WEIGHTS_NAME
    assert raw_file.is_file() and ema_file.is_file() and hub.has_variant(output, hub.EMA_VARIANT)
    raw, ema = hub.load_vae(output), hub.load_vae(output, variant=hub.EMA_VARIANT)
    assert_weights(raw, raw_file)
    assert_weights(ema, ema_file)
    assert any(not torch.equal(a, b) for a, b in zip(raw.state_dict().values(), ema.state_dict().values())), \
        "after 2 steps the EMA differs from the raw weights: otherwise this test could not tell them apart"

    listing = push_dry_run(output, tmp_path / "staged", capsys)
    staged = tmp_path / "staged"
    assert hub.EMA_WEIGHTS_NAME in listing
    assert_weights(hub.load_vae(staged), raw_file)
    assert_weights(hub.load_vae(staged, variant=hub.EMA_VARIANT), ema_file)
    assert not list(staged.glob("tiny-run*.safetensors"))  # the tiny/SE architectures get no ComfyUI/A1111 file
    card = (staged / "README.md").read_text()
    assert 'variant="ema"' in card and "ComfyUI" not in card
    config = json.loads((staged / "config.json").read_text())
    assert config["_class_name"] == ("KLVAE" if squeeze_excitation else "AutoencoderKL")
    assert hub.load_vae(staged).config.encoder_squeeze_excitation is squeeze_excitation
    if squeeze_excitation:
        assert "from diffusers_klvae import KLVAE" in card

    # --no-ema publishes the raw weights only
    code = hub.main([str(output), "--repo-id", REPO_ID, "--dry-run", "--no-ema", "--folder", str(tmp_path / "no-ema")])
    assert code == 0 and not (tmp_path / "no-ema" / hub.EMA_WEIGHTS_NAME).exists()
    with pytest.raises(FileNotFoundError, match="no 'ema' weights"):
        hub.load_vae(tmp_path / "no-ema", variant=hub.EMA_VARIANT)
