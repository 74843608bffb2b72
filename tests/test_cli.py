"""The `klvae` command (issue 9): every subcommand end to end on a tiny saved model, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from diffusers_klvae import KLVAE
from diffusers_klvae.cli import main
from diffusers_klvae.imaging import load_image, resize_and_crop, to_pil, to_tensor
from diffusers_klvae.latents import decode_latents, encode_images, scale_latents

SIZE = 32




@pytest.fixture(scope="module")
def work(tmp_path_factory, photo_paths):
    """A tiny f2 model saved as a diffusers folder, two 32x32 photos and one 33x33 photo."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    KLVAE.from_preset("tiny").save_pretrained(root / "model")
    for i, path in enumerate(photo_paths[:2]):
        resize_and_crop(load_image(path), SIZE).save(root / f"im{i}.png")
    resize_and_crop(load_image(photo_paths[2]), SIZE + 1).save(root / "odd.png")
    return root


def run(*argv) -> int:
    return main([str(a) for a in argv])


def pixels(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).int()


def images(work) -> torch.Tensor:
    return torch.stack([to_tensor(load_image(work / f"im{i}.png")) for i in range(2)])


def reconstructions(work) -> list[torch.Tensor]:
    """decode(encode(x)) of the two photos, computed in-process, as uint8 (H, W, 3)."""
    vae = KLVAE.from_pretrained(work / "model")
    return [torch.from_numpy(np.array(img)).int() for img in to_pil(decode_latents(vae, encode_images(vae, images(work))))]


def test_reconstruct_writes_each_image_and_a_grid(work):
    out = work / "rec"
    assert run("reconstruct", "--model", work / "model", work / "im0.png", work / "im1.png", "--out", out, "--grid", out / "grid.png") == 0
    for i, reference in enumerate(reconstructions(work)):
        written = pixels(out / f"im{i}.png")
        assert written.shape == (SIZE, SIZE, 3)
        assert (written - reference).abs().max() <= 1
    assert Image.open(out / "grid.png").size == (3 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)  # original | rec | error


def test_reconstruct_grid_of_two_sizes_fails_before_writing_anything(work, capsys):
    resize_and_crop(load_image(work / "im1.png"), SIZE + 2).save(work / "bigger.png")
    out = work / "rec-mixed"
    with pytest.raises(SystemExit) as exit_info:
        run("reconstruct", "--model", work / "model", work / "im0.png", work / "bigger.png", "--out", out, "--grid", out / "grid.png")
    assert exit_info.value.code == 2 and f"images differ in size ({SIZE}x{SIZE}, {SIZE + 2}x{SIZE + 2})" in capsys.readouterr().err
    assert not list(out.glob("*.png"))


def test_inputs_sharing_a_file_name_get_numbered_outputs(work):
    for sub in ("a", "b"):  # a/im.png and b/im.png: one output would replace the other
        (work / "dup" / sub).mkdir(parents=True, exist_ok=True)
        Image.open(work / f"im{sub == 'b':d}.png").save(work / "dup" / sub / "im.png")
    out = work / "rec-dup"
    assert run("reconstruct", "--model", work / "model", work / "dup", "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000-im.png", "0001-im.png"]
    assert run("encode", "--model", work / "model", work / "dup", "-o", work / "dup.safetensors") == 0
    assert run("decode", "--model", work / "model", work / "dup.safetensors", "--out", work / "dec-dup") == 0
    assert sorted(p.name for p in (work / "dec-dup").iterdir()) == ["0000-im.png", "0001-im.png"]


def test_encode_then_decode_round_trips(work):
    raw_file, scaled_file = work / "raw.safetensors", work / "scaled.safetensors"
    model = work / "model"
    assert run("encode", "--model", model, work / "im0.png", work / "im1.png", "-o", raw_file) == 0
    assert run("encode", "--model", model, work / "im0.png", work / "im1.png", "-o", scaled_file, "--scaled") == 0
    vae = KLVAE.from_pretrained(model)
    expected = encode_images(vae, images(work))
    with safe_open(str(raw_file), framework="pt") as f:
        raw, meta = f.get_tensor("latents"), f.metadata()
    with safe_open(str(scaled_file), framework="pt") as f:
        scaled, scaled_meta = f.get_tensor("latents"), f.metadata()
    assert raw.shape == (2, 4, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(raw, expected)
    torch.testing.assert_close(scaled, scale_latents(vae, expected))
    assert (meta["space"], scaled_meta["space"]) == ("raw", "diffusion")
    assert json.loads(meta["files"]) == ["im0.png", "im1.png"]

    assert run("decode", "--model", model, raw_file, "--out", work / "dec_raw") == 0
    assert run("decode", "--model", model, scaled_file, "--out", work / "dec_scaled") == 0  # unscaled from metadata
    for name, reference in zip(("im0.png", "im1.png"), reconstructions(work)):
        assert (pixels(work / "dec_raw" / name) - reference).abs().max() <= 1
        assert (pixels(work / "dec_scaled" / name) - reference).abs().max() <= 1


def test_decode_unscales_with_the_scaling_recorded_in_the_file(work, tmp_path, caplog):
    # encode --scaled at 0.18215, then refit the config to 0.8976: decode must still undo 0.18215 (it used 0.8976)
    model = tmp_path / "model"
    KLVAE.from_pretrained(work / "model", shift_factor=0.25).save_pretrained(model)
    assert run("encode", "--model", model, work / "im0.png", work / "im1.png", "-o", tmp_path / "z.safetensors", "--scaled") == 0
    config = json.loads((model / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"]) == (0.18215, 0.25)
    (model / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.8976, "shift_factor": 0.0}))
    caplog.clear()
    assert run("decode", "--model", model, tmp_path / "z.safetensors", "--out", tmp_path / "dec") == 0
    vae = KLVAE.from_pretrained(work / "model")
    for i, name in enumerate(("im0.png", "im1.png")):  # the tiny model's weights, the file's scaling
        reference = to_pil(decode_latents(vae, encode_images(vae, images(work)[i : i + 1])))[0]
        assert (pixels(tmp_path / "dec" / name) - torch.from_numpy(np.array(reference)).int()).abs().max() <= 1
    err = caplog.text
    assert "latents scaled with scaling_factor 0.18215 (recorded in the file), the model's config has 0.8976: using the file's" in err
    assert "latents scaled with shift_factor 0.25 (recorded in the file), the model's config has 0.0" in err


def test_interpolate_and_sample_write_grids(work):
    frames = work / "frames"
    assert run("interpolate", "--model", work / "model", work / "im0.png", work / "im1.png", "--steps", 4,
               "-o", work / "interp.png", "--frames-dir", frames) == 0
    assert Image.open(work / "interp.png").size == (4 * (SIZE + 2) + 2, SIZE + 4)
    assert sorted(p.name for p in frames.iterdir()) == [f"frame_{i:03d}.png" for i in range(4)]
    # the end frames are the reconstructions of the two images
    first, last = reconstructions(work)
    assert (pixels(frames / "frame_000.png") - first).abs().max() <= 1
    assert (pixels(frames / "frame_003.png") - last).abs().max() <= 1

    assert run("sample", "--model", work / "model", "-n", 3, "--height", 16, "--width", 24, "-o", work / "s.png", "--seed", 1) == 0
    assert Image.open(work / "s.png").size == (3 * (24 + 2) + 2, 16 + 4)


def test_preview_fits_stores_and_reuses_the_map(work, tmp_path, capsys):
    model = tmp_path / "model"
    KLVAE.from_pretrained(work / "model").save_pretrained(model)
    with pytest.raises(SystemExit) as exit_info:
        run("preview", "--model", model, work / "im0.png", "-o", tmp_path / "p.png")
    assert exit_info.value.code == 2 and "no `latent_rgb_factors`" in capsys.readouterr().err
    assert run("preview", "--model", model, work / "im0.png", "--fit", work / "im0.png", work / "im1.png", "--store",
               "-o", tmp_path / "p.png") == 0
    factors = json.loads((model / "config.json").read_text())["latent_rgb_factors"]
    assert np.asarray(factors).shape == (5, 3)
    assert KLVAE.from_pretrained(model).config.latent_rgb_factors == factors
    assert run("encode", "--model", model, work / "im0.png", "-o", tmp_path / "z.safetensors") == 0
    assert run("preview", "--model", model, "--latents", tmp_path / "z.safetensors", work / "im1.png", "-o", tmp_path / "q.png") == 0
    assert Image.open(tmp_path / "q.png").size == (2 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reconstruct", "--model", "{model}", "{w}/missing.png", "--out", "{w}/o"], "no such image"),
        (["reconstruct", "--model", "{w}/no_model", "{w}/im0.png", "--out", "{w}/o"], "cannot load model"),
        (["encode", "--model", "{model}", "{w}/odd.png", "-o", "{w}/z.safetensors"], "33x33, not a multiple of 2"),
        (["encode", "--model", "{model}", "{w}/im0.png", "-o", "{w}/z.npy"], "must end in .safetensors"),
        (["decode", "--model", "{model}", "{w}/im0.png", "--out", "{w}/o"], "cannot read"),
        (["decode", "--model", "{model}", "{w}/three.safetensors", "--out", "{w}/o"], "expected (B, 4, h, w)"),
        (["decode", "--model", "{model}", "{w}/three.safetensors", "--key", "x", "--out", "{w}/o"], "has no tensor 'x'"),
        (["sample", "--model", "{model}", "--height", "15", "-o", "{w}/s.png"], "not a multiple"),
        (["interpolate", "--model", "{model}", "{w}/im0.png", "{w}/odd.png", "-o", "{w}/i.png"], "not a multiple"),
    ],
)
def test_bad_input_is_one_line_exit_2(work, argv, message, capsys):
    save_file({"latents": torch.zeros(1, 3, 4, 4)}, str(work / "three.safetensors"))
    argv = [a.format(model=work / "model", w=work) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"klvae {argv[0]}: error:") and message in err[0], err


def test_help_documents_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("reconstruct", "encode", "decode", "interpolate", "sample", "preview", "eval", "stats", "push"):
        assert command in text
    for command, option in (("encode", "--scaled"), ("decode", "--space"), ("interpolate", "--method"),
                            ("sample", "--temperature"), ("preview", "--store"), ("reconstruct", "--grid")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert option in capsys.readouterr().out


@pytest.mark.parametrize("command, module", [("eval", "evaluation"), ("stats", "latent_stats"), ("push", "hub")])
def test_forwarded_commands_reach_their_module(command, module, monkeypatch, capsys):
    import importlib

    target = importlib.import_module(f"diffusers_klvae.{module}")
    calls = []
    monkeypatch.setattr(target, "main", lambda argv=None: calls.append(argv) or 0)
    assert main([command, "--model", "m", "--flag"]) == 0
    assert calls == [["--model", "m", "--flag"]]

    monkeypatch.setitem(__import__("sys").modules, f"diffusers_klvae.{module}", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"klvae {command}: error: 'klvae {command}' is unavailable")
