"""The one model loader (``loading.load_vae``): every spec kind, variants, dtype, Hub arguments, one-line errors."""

import os

import pytest
import torch

from diffusers_klvae import KLVAE
from diffusers_klvae.loading import EMA_VARIANT, EMA_WEIGHTS_NAME, has_variant, load_vae


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return KLVAE.from_preset("tiny").eval(), KLVAE.from_preset("tiny").eval()


def same_weights(a, b) -> bool:
    return all(torch.equal(a.state_dict()[k], v.to(a.state_dict()[k].dtype)) for k, v in b.state_dict().items())


def test_folder_pipeline_folder_and_ema_variant(models, tmp_path):
    raw, ema = models
    raw.save_pretrained(tmp_path / "run")
    ema.save_pretrained(tmp_path / "run", variant=EMA_VARIANT)  # the layout training writes
    raw.save_pretrained(tmp_path / "pipeline" / "vae")
    assert (tmp_path / "run" / EMA_WEIGHTS_NAME).is_file()
    assert has_variant(tmp_path / "run") and not has_variant(tmp_path / "pipeline") and not has_variant(tmp_path / "x")
    assert same_weights(load_vae(tmp_path / "run"), raw) and same_weights(load_vae(tmp_path / "run", variant="ema"), ema)
    assert same_weights(load_vae(tmp_path / "pipeline"), raw)  # vae/ is found
    assert same_weights(load_vae(tmp_path / "pipeline", subfolder="vae"), raw)
    half = load_vae(tmp_path / "run", dtype="float16")
    assert half.dtype == torch.float16 and same_weights(half, raw.half())
    with pytest.raises(FileNotFoundError, match="no 'ema' weights in .*pipeline"):
        load_vae(tmp_path / "pipeline", variant=EMA_VARIANT)


def test_single_file_module_and_preset(models, tmp_path):
    raw, _ = models
    KLVAE.from_preset("sd-kl-f8").save_single_file(tmp_path / "sd.safetensors")
    assert load_vae(tmp_path / "sd.safetensors").config.latent_channels == 4
    with pytest.raises(ValueError, match="a single file has no weights variants"):
        load_vae(tmp_path / "sd.safetensors", variant=EMA_VARIANT)
    assert load_vae(raw) is raw
    assert load_vae(raw, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert load_vae("tiny").config.block_out_channels == raw.config.block_out_channels


def test_hub_ids_pass_subfolder_revision_and_variant(monkeypatch):
    calls = []
    monkeypatch.setattr(KLVAE, "from_pretrained", classmethod(lambda cls, *a, **kw: calls.append((a, kw)) or "model"))
    assert load_vae("org/pipeline/vae", revision="v1", variant="fp16") == "model"
    assert load_vae("org/vae", dtype=torch.float16, subfolder="vae") == "model"
    assert calls[0] == (("org/pipeline",), dict(subfolder="vae", variant="fp16", revision="v1", torch_dtype=None))
    assert calls[1] == (("org/vae",), dict(subfolder="vae", variant=None, revision=None, torch_dtype=torch.float16))


def test_a_hub_id_whose_org_is_a_local_folder_is_still_tried_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stabilityai" / "sdxl-vae").mkdir(parents=True)  # e.g. another VAE downloaded with --local-dir
    tried = []

    def offline(cls, repo, **kwargs):
        tried.append(repo)
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(KLVAE, "from_pretrained", classmethod(offline))
    with pytest.raises(ValueError, match=r"cannot load model 'stabilityai/sd-vae-ft-mse': no such local folder \(though "
                                         r"'stabilityai' is one here\), and as a Hub id: OSError: We couldn't connect"):
        load_vae("stabilityai/sd-vae-ft-mse")
    assert tried == ["stabilityai/sd-vae-ft-mse"]


@pytest.mark.parametrize("spec, message", [
    ("./no/such/model.ckpt", "not an existing folder or file, not a preset"),
    ("empty", r"has no config.json \(nor vae/config.json\)"),
    ("bad.safetensors", "cannot load model .*bad.safetensors"),
    ("noweights", "folder 'noweights' has config.json but no weights: expected diffusion_pytorch_model.safetensors"),
    ("listconfig", r"'listconfig/config.json' is not a JSON object: expected a diffusers model config"),
    ("photo.png", r"'photo.png': a file that is not a model; expected a single file \(.safetensors, .ckpt"),
    ("fifo", "cannot load model 'fifo': not a folder or a regular file"),
])
def test_errors_are_one_line_naming_what_was_expected(spec, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    (tmp_path / "listconfig").mkdir()
    (tmp_path / "listconfig" / "config.json").write_text("[1, 2, 3]")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG not a model")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match=message) as info:
        load_vae(spec)
    assert "\n" not in str(info.value)
