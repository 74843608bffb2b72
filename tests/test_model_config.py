"""Config validation, input checks, presets and the squeeze-and-excitation extra of KLVAE."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

from diffusers_klvae import KLVAE, list_presets, preset_config


def tiny(**overrides) -> dict:
    return {**preset_config("tiny"), **overrides}


# ------------------------------------------------------------------ config validation
@pytest.mark.parametrize(
    "overrides, must_name",
    [
        (dict(down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D")), ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
        (dict(up_block_types=("UpDecoderBlock2D", "Up")), ["'Up'", "UpDecoderBlock2D"]),
        (dict(block_out_channels=(8, 18)), ["18", "norm_num_groups=4"]),
        (dict(norm_num_groups=3), ["8", "norm_num_groups=3"]),
        (dict(down_block_types=("DownEncoderBlock2D",) * 3), ["3", "down_block_types", "2"]),
        (dict(up_block_types=("UpDecoderBlock2D",)), ["1", "up_block_types", "2"]),
        (dict(act_fn="tanh"), ["tanh", "silu", "gelu"]),
        (dict(latent_channels=0), ["latent_channels", "0"]),
        (dict(layers_per_block=0), ["layers_per_block", "0"]),
        (dict(block_out_channels=(-8, 16)), ["block_out_channels entries must be positive integers; got -8"]),
        (dict(block_out_channels=(), down_block_types=(), up_block_types=()), ["block_out_channels"]),
    ],
)
def test_config_errors_name_the_value_and_what_is_allowed(overrides, must_name):
    with pytest.raises(ValueError) as err:
        KLVAE(**tiny(**overrides))
    for text in must_name:
        assert text in str(err.value), (text, str(err.value))


# ------------------------------------------------------------------ input checks
@pytest.fixture(scope="module")
def vae():
    return KLVAE(**tiny()).eval()  # factor 2


def test_wrong_channel_count(vae):
    with pytest.raises(ValueError, match=r"expected 3 channels.*\(1, 4, 8, 8\)"):
        vae.encode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"expected 4 channels.*\(1, 3, 4, 4\)"):
        vae.decode(torch.randn(1, 3, 4, 4))


def test_size_not_a_multiple_of_the_factor():
    vae = KLVAE.from_preset("small")  # factor 8
    with pytest.raises(ValueError) as err:
        vae.encode(torch.randn(1, 3, 64, 60))
    message = str(err.value)
    assert "60" in message and "8" in message and "56" in message and "64" in message and "width" in message
    with pytest.raises(ValueError, match=r"height 5 .* factor 8.*\b8\b"):
        vae.encode(torch.randn(1, 3, 5, 8))


def test_non_floating_and_wrong_rank(vae):
    with pytest.raises(ValueError, match="floating") as err:
        vae.encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    assert "uint8" in str(err.value)
    with pytest.raises(ValueError, match=r"4-D.*3-D") as err:
        vae.encode(torch.randn(3, 8, 8))
    assert "batch" in str(err.value)
    with pytest.raises(ValueError, match="4-D"):
        vae.decode(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        vae(torch.randn(1, 1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"the image tensor is empty: shape \(0, 3, 8, 8\)"):
        vae.encode(torch.randn(0, 3, 8, 8))  # not torch's "cannot reshape tensor of 0 elements"


# ------------------------------------------------------------------ presets
EXPECTED_PRESETS = {"sd-kl-f8", "sdxl", "kl-f8-16ch", "small", "tiny"}


def test_presets_listed():
    assert EXPECTED_PRESETS <= set(list_presets())
    assert KLVAE.list_presets() == list_presets()


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_each_preset_is_plain_config_and_autoencoderkl_compatible(name):
    from accelerate import init_empty_weights

    config = KLVAE.preset_config(name)
    with init_empty_weights():  # structure only: cheap for the 84M-parameter presets
        ours, ref = KLVAE(**config), AutoencoderKL(**config)
        from_preset = KLVAE.from_preset(name)
    assert dict(from_preset.config) == dict(ours.config)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    config["block_out_channels"] = "mutated"
    assert KLVAE.preset_config(name)["block_out_channels"] != "mutated"  # a fresh copy each time


def test_preset_fields():
    sd, sdxl, ch16 = (preset_config(n) for n in ("sd-kl-f8", "sdxl", "kl-f8-16ch"))
    assert tuple(sd["block_out_channels"]) == (128, 256, 512, 512) and sd["layers_per_block"] == 2
    assert sdxl["scaling_factor"] == 0.13025
    assert ch16["latent_channels"] == 16 and ch16["use_quant_conv"] is False and ch16["use_post_quant_conv"] is False
    assert ch16["shift_factor"] is not None and ch16["scaling_factor"] is not None
    small = KLVAE.from_preset("small")
    assert small.downsampling_factor == 8
    with torch.no_grad():
        assert small.encode(torch.randn(1, 3, 64, 64)).latent_dist.mean.shape == (1, 4, 8, 8)


def test_from_preset_overrides_and_unknown_name():
    assert KLVAE.from_preset("tiny", latent_channels=8).config.latent_channels == 8
    with pytest.raises(ValueError) as err:
        KLVAE.from_preset("sd-kl-f16")
    assert "sd-kl-f16" in str(err.value)
    for name in EXPECTED_PRESETS:
        assert name in str(err.value)


# ------------------------------------------------------------------ squeeze-and-excitation
def se_parameters(model):
    return sum(p.numel() for n, p in model.named_parameters() if "squeeze_excitation" in n)


def test_se_is_small_and_encoder_only():
    plain = KLVAE.from_preset("small")
    se = KLVAE.from_preset("small", encoder_squeeze_excitation=True)
    extra = sum(p.numel() for p in se.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == se_parameters(se)
    assert 1_000 <= extra <= 20_000, extra  # "a few thousand parameters"
    assert se_parameters(se.decoder) == 0
    assert se.config.encoder_squeeze_excitation is True


def test_se_is_identity_at_init():
    plain = KLVAE(**tiny()).eval()
    se = KLVAE(**tiny(encoder_squeeze_excitation=True)).eval()
    missing, unexpected = se.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all("squeeze_excitation" in k for k in missing)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(se.encode(x).latent_dist.parameters, plain.encode(x).latent_dist.parameters)
    # the gates are trainable: one step moves them and changes the output
    se.train()
    se(x).sample.square().mean().backward()
    grads = [p.grad for n, p in se.named_parameters() if "squeeze_excitation" in n and n.endswith("fc2.weight")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_se_survives_save_and_load(tmp_path):
    se = KLVAE(**tiny(encoder_squeeze_excitation=True))
    with torch.no_grad():
        for name, p in se.named_parameters():
            if "squeeze_excitation" in name:
                p.normal_()  # trained gates, not the identity
    se.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["encoder_squeeze_excitation"] is True and saved["_class_name"] == "KLVAE"
    loaded, info = KLVAE.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert loaded.config.encoder_squeeze_excitation is True
    assert list(loaded.config.down_block_types) == ["DownEncoderBlock2D"] * 2
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert (loaded(x).sample - se.eval()(x).sample).abs().max() <= 1e-5
    # and it saves again as it was
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    again.pop("_name_or_path")  # diffusers records where a loaded model came from (AutoencoderKL does too)
    assert again == saved


def test_autoencoderkl_refuses_an_se_folder(tmp_path):
    KLVAE(**tiny(encoder_squeeze_excitation=True)).save_pretrained(tmp_path)
    with pytest.raises(Exception) as err:
        AutoencoderKL.from_pretrained(tmp_path)
    assert "diffusers_klvae" in str(err.value)
