"""Issue 16: every error of `klvae`, `klvae-eval` and `klvae-stats` is one line naming what was expected, exit status 2,
no traceback; a full disk names the file; non-finite latents or pixels are refused instead of written as black."""

from __future__ import annotations

import errno
import os
import re
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers_klvae import KLVAE, evaluation, latent_stats
from diffusers_klvae.cli import main as klvae_main
from diffusers_klvae.cli_support import DiskFull, writing
from diffusers_klvae.imaging import load_image, resize_and_crop

SIZE = 32
COMMANDS = {"klvae": klvae_main, "klvae-eval": evaluation.main, "klvae-stats": latent_stats.main}


@pytest.fixture(scope="module")
def work(tmp_path_factory, photo_paths):
    """A tiny f2 model folder, two 32x32 photos in a folder, latents files with NaN and Inf, a float TIFF with NaN."""
    root = tmp_path_factory.mktemp("errors")
    torch.manual_seed(0)
    KLVAE.from_preset("tiny").save_pretrained(root / "model")
    (root / "photos").mkdir()
    for i, path in enumerate(photo_paths[:2]):
        resize_and_crop(load_image(path), SIZE).save(root / "photos" / f"im{i}.png")
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        latents = torch.zeros(1, 4, 16, 16)
        latents[0, 1, 2, 3] = value
        save_file({"latents": latents}, str(root / f"{name}.safetensors"))
    save_file({"latents": torch.zeros(1, 4, 16, 16)}, str(root / "zeros.safetensors"))
    save_file({"latents": torch.zeros(0, 4, 16, 16)}, str(root / "none.safetensors"))
    save_file({"latents": torch.zeros(1, 4, 16, 16)}, str(root / "badscale.safetensors"), metadata={"space": "diffusion", "scaling_factor": "abc"})
    (root / "empty").mkdir()
    os.mkfifo(root / "fifo.png")
    Image.fromarray(np.full((SIZE, SIZE), np.nan, dtype=np.float32), "F").save(root / "nan.tif")
    return root


def run(command: str, argv: list[str]) -> int:
    """Exit status of a command, whether it returns it or exits (argparse and `klvae` exit)."""
    try:
        return COMMANDS[command](argv)
    except SystemExit as exit_info:
        return exit_info.code


def error_lines(stderr: str) -> list[str]:
    """stderr without progress bars (tqdm redraws, "evaluate: 2img [...]"); there must be no traceback either."""
    assert "Traceback" not in stderr
    return [line for line in stderr.strip().splitlines() if not re.match(r"^(evaluate|latent statistics): .*\]$", line)]


BAD = [  # (command, argv, what the one line must say)
    ("klvae", ["sample", "--model", "{model}", "-n", "0", "-o", "{w}/s.png"], "argument -n/--num: expected an integer >= 1, got 0"),
    ("klvae", ["sample", "--model", "{model}", "--height", "abc", "-o", "{w}/s.png"], "expected an integer >= 1, got 'abc'"),
    ("klvae", ["sample", "--model", "{model}", "--temperature", "nan", "-o", "{w}/s.png"], "expected a finite number > 0, got 'nan'"),
    ("klvae", ["sample", "--model", "{model}", "--temperature", "0", "-o", "{w}/s.png"], "expected a finite number > 0, got '0'"),
    ("klvae", ["interpolate", "--model", "{model}", "{w}/photos/im0.png", "{w}/photos/im1.png", "--steps", "1", "-o", "{w}/i.png"],
     "argument --steps: expected an integer >= 2, got 1"),
    ("klvae", ["reconstruct", "--model", "{model}", "{w}/photos", "--out", "{w}/o", "--resolution", "0"], "expected an integer >= 1, got 0"),
    ("klvae", ["reconstruct", "--model", "{model}", "{w}/photos", "--out", "{w}/o", "--resolution", "33"],
     "--resolution 33 is not a multiple of the model's downsampling factor 2"),
    ("klvae", ["encode", "--model", "{model}", "-o", "{w}/z.safetensors"], "the following arguments are required: images"),
    ("klvae", ["bogus"], "invalid choice: 'bogus'"),
    ("klvae", ["decode", "--model", "{model}", "{w}/nan.safetensors", "--out", "{w}/dec_nan"], "the latents contain 1 NaN/Inf values of 1024"),
    ("klvae", ["decode", "--model", "{model}", "{w}/inf.safetensors", "--out", "{w}/dec_inf"], "the latents contain 1 NaN/Inf values of 1024"),
    ("klvae", ["encode", "--model", "{model}", "{w}/nan.tif", "-o", "{w}/z.safetensors"], "no readable image among 1 given"),
    ("klvae", ["interpolate", "--model", "{model}", "{w}/photos/im0.png", "{w}/nan.tif", "-o", "{w}/i.png"], "non-finite pixels"),
    ("klvae", ["reconstruct", "--model", "{model}", "{w}/nothing.png", "--out", "{w}/o"], "no such image"),
    ("klvae", ["sample", "--model", "{model}", "--device", "nodevice", "-o", "{w}/s.png"], "nodevice"),
    ("klvae-eval", ["--model", "{model}", "--data", "{w}/photos", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    ("klvae-eval", ["--model", "{model}", "--data", "{w}/photos", "--protocol", "dit"], "argument --protocol: invalid choice: 'dit'"),
    ("klvae-eval", ["--model", "{model}", "--data", "{w}/photos", "--resolution", "4"], "expected an integer >= 8, got 4"),
    ("klvae-eval", ["--model", "{model}", "--data", "{w}/photos", "--metrics", "psnr", "--device", "nodevice"], "nodevice"),
    ("klvae-eval", ["--data", "{w}/photos"], "the following arguments are required: --model"),
    ("klvae-eval", ["--model", "{model}", "--data", "{w}/photos", "--output", "{w}/zeros.safetensors"],
     "--output '{w}/zeros.safetensors' exists and is not a folder"),  # said before the evaluation, not after it
    ("klvae-eval", ["--model", "{model}", "--data", "{w}/fifo.png"], "is neither a folder nor a regular file"),
    ("klvae-eval", ["--model", "{model}", "--data", "{w}/zeros.safetensors"], "is not an image file (.jpg"),
    ("klvae-stats", ["--model", "{model}", "--data", "{w}/photos", "--output", "{w}/zeros.safetensors/stats"],
     "--output '{w}/zeros.safetensors/stats' is under '{w}/zeros.safetensors', which is a file"),
    ("klvae", ["encode", "--model", "{model}", "{w}/empty", "-o", "{w}/z.safetensors"], "no image files found in '{w}/empty'"),
    ("klvae", ["decode", "--model", "{model}", "{w}/none.safetensors", "--out", "{w}/dec_none"],
     "the latent tensor is empty: shape (0, 4, 16, 16)"),  # the model's own input check
    ("klvae", ["interpolate", "--model", "{model}", "{w}/photos/im0.png", "{w}/photos/im1.png", "-o", "{w}/i.png",
               "--frames-dir", "{w}/zeros.safetensors"], "--frames-dir '{w}/zeros.safetensors' exists and is not a folder"),
    ("klvae-stats", ["--model", "{model}", "--data", "{w}/photos", "--max-images", "1"], "argument --max-images: expected an integer >= 2, got 1"),
    ("klvae-stats", ["--model", "{model}", "--data", "{w}/photos", "--per-channel"], "--per-channel only applies with --write-config"),
    ("klvae", ["decode", "--model", "{model}", "{w}/fifo.png", "--out", "{w}/o"],
     "latents '{w}/fifo.png' is not a regular file: expected a .safetensors file"),  # was "no such latents file"
    ("klvae", ["decode", "--model", "{model}", "{w}/badscale.safetensors", "--out", "{w}/o"],
     "'{w}/badscale.safetensors': metadata 'scaling_factor' is 'abc': expected a finite non-zero number"),
]


@pytest.mark.parametrize("command, argv, message", BAD, ids=[f"{c} {' '.join(a[:1] + a[-2:])}" for c, a, _ in BAD])
def test_bad_input_is_one_line_naming_what_was_expected(work, command, argv, message, capsys):
    argv = [a.format(model=work / "model", w=work) for a in argv]
    assert run(command, argv) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    prog = f"klvae {argv[0]}" if command == "klvae" and argv[0] != "bogus" else command
    assert err[0].startswith(f"{prog}: error: ") and message.format(w=work) in err[0], err
    assert "Traceback" not in err[0]


def test_refused_latents_write_no_image(work, capsys):
    assert run("klvae", ["decode", "--model", str(work / "model"), str(work / "nan.safetensors"), "--out", str(work / "dec_none")]) == 2
    assert not any((work / "dec_none").glob("*.png"))  # before the fix: a black PNG and exit status 0


@pytest.fixture(scope="module")
def nan_models(work, tmp_path_factory):
    """Copies of the tiny model: one with a NaN decoder weight, one whose config.json has "scaling_factor": NaN."""
    root = tmp_path_factory.mktemp("nan_models")
    vae = KLVAE.from_pretrained(work / "model")
    KLVAE.from_pretrained(work / "model", scaling_factor=float("nan")).save_pretrained(root / "nanscale")
    with torch.no_grad():
        vae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    vae.save_pretrained(root / "nanw")
    return root


@pytest.mark.parametrize("model, argv, message", [
    ("nanw", ["sample", "-n", "1", "--height", "16", "--width", "16", "-o", "{o}/s.png"], "the decoded images contain"),
    ("nanw", ["interpolate", "{w}/photos/im0.png", "{w}/photos/im1.png", "--steps", "2", "-o", "{o}/i.png", "--frames-dir", "{o}/f"],
     "the decoded images contain"),
    ("nanw", ["reconstruct", "{w}/photos", "--out", "{o}/r", "--grid", "{o}/g.png"], "the decoded images contain"),
    # finite latents, a model that decodes NaN (as a float16 overflow does): no black PNG
    ("nanw", ["decode", "{w}/zeros.safetensors", "--out", "{o}/d"], "the decoded images contain"),
    ("nanscale", ["sample", "-n", "1", "--height", "16", "--width", "16", "-o", "{o}/s.png"], "the decoded images contain"),
    ("nanscale", ["encode", "{w}/photos", "--scaled", "-o", "{o}/z.safetensors"], "the latents scaled with the model's scaling_factor nan contain"),
])
def test_non_finite_outputs_are_refused_and_nothing_written(work, nan_models, tmp_path, model, argv, message, capsys):
    # before the fix sample/interpolate wrote black pixels and encode --scaled a file of NaNs, exit status 0
    argv = [argv[0], "--model", str(nan_models / model)] + [a.format(w=work, o=tmp_path) for a in argv[1:]]
    assert run("klvae", argv) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"klvae {argv[0]}: error: {message}"), err
    assert not list(tmp_path.iterdir())  # not even an empty --out / --frames-dir folder


@pytest.mark.parametrize("files", ["123", "[1,2]", '[null,"a"]', "a.png,b.png", '["a.png"]'])
def test_unusable_files_metadata_numbers_the_images_with_a_warning(work, tmp_path, files, caplog, capsys):
    latents = tmp_path / "m.safetensors"
    save_file({"latents": torch.zeros(2, 4, 16, 16)}, str(latents), metadata={"files": files})
    assert run("klvae", ["decode", "--model", str(work / "model"), str(latents), "--out", str(tmp_path / "d")]) == 0  # was a TypeError
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["0000.png", "0001.png"]
    assert "Traceback" not in capsys.readouterr().err
    assert f"{latents}: metadata 'files' is {files!r}, expected a JSON list of 2 file names: numbering the images instead" in caplog.messages


def _same_files(folder, before: dict) -> bool:
    return {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("argv", [
    ["reconstruct", "{i}", "--out", "{i}"],
    ["reconstruct", "{i}", "--out", "{i}/../{i.name}"],
    ["reconstruct", "{i}", "--out", "{t}/r", "--grid", "{i}/im1.png"],
    ["interpolate", "{i}/im0.png", "{i}/im1.png", "-o", "{i}/im1.png"],
    ["interpolate", "{i}/frame_000.png", "{i}/im1.png", "-o", "{t}/i.png", "--frames-dir", "{i}", "--steps", "2"],
    ["preview", "{i}", "--fit", "{i}", "-o", "{i}/im0.png"],
    ["reconstruct", "{i}/im0.png", "--out", "{t}/hard"],  # hard/im0.png is a hard link to the input
])
def test_an_output_that_is_an_input_is_refused(work, tmp_path, argv, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("im0.png", "im1.png"):
        (inputs / name).write_bytes((work / "photos" / name).read_bytes())
    (inputs / "frame_000.png").write_bytes((work / "photos" / "im0.png").read_bytes())  # named as --frames-dir's first frame
    (tmp_path / "hard").mkdir()
    os.link(inputs / "im0.png", tmp_path / "hard" / "im0.png")
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    argv = [argv[0], "--model", str(work / "model")] + [a.format(i=inputs, t=tmp_path) for a in argv[1:]]
    assert run("klvae", argv) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "it would be overwritten; expected an output path that is not an input" in err[0], err
    assert _same_files(inputs, before) and not (tmp_path / "r").exists()  # refused before any work


@pytest.mark.parametrize("argv, message", [
    (["reconstruct", "{p}/im0.png", "{p}/im1.png", "--out", "{t}/r", "--grid", "{t}/r/im0.png"],
     "output '{t}/r/im0.png' would be written twice (also as '{t}/r/im0.png'): expected distinct outputs"),
    (["interpolate", "{p}/im0.png", "{p}/im1.png", "-o", "{t}/f/frame_000.png", "--frames-dir", "{t}/f", "--steps", "2"],
     "output '{t}/f/frame_000.png' would be written twice"),
    (["reconstruct", "{t}/mix/im0.jpg", "--out", "{t}/mix"],  # mix/im0.png is an original, not an input
     "--out '{t}/mix' already holds im0.png (klvae never replaces a file there, which may be an original image)"),
])
def test_one_output_never_replaces_another_file(work, tmp_path, argv, message, capsys):
    (tmp_path / "mix").mkdir()
    Image.open(work / "photos" / "im0.png").convert("RGB").save(tmp_path / "mix" / "im0.jpg")
    (tmp_path / "mix" / "im0.png").write_bytes((work / "photos" / "im0.png").read_bytes())
    argv = [argv[0], "--model", str(work / "model")] + [a.format(p=work / "photos", t=tmp_path) for a in argv[1:]]
    assert run("klvae", argv) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and message.format(t=tmp_path) in err[0], err
    assert (tmp_path / "mix" / "im0.png").read_bytes() == (work / "photos" / "im0.png").read_bytes()


def test_outputs_of_inputs_without_a_usable_name_are_numbered(work, tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("b.png", "..png"):  # "..png" has no stem to write: it failed after b.png was written
        (tmp_path / "in" / name).write_bytes((work / "photos" / "im0.png").read_bytes())
    inputs = [str(tmp_path / "in" / "b.png"), str(tmp_path / "in" / "..png")]
    assert run("klvae", ["reconstruct", "--model", str(work / "model"), *inputs, "--out", str(tmp_path / "r")]) == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["0000-b.png", "0001.png"]


def test_decode_never_replaces_a_file(work, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("im0.png", "im1.png"):
        (photos / name).write_bytes((work / "photos" / name).read_bytes())
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    model = str(work / "model")
    assert run("klvae", ["encode", "--model", model, str(photos), "-o", str(tmp_path / "z.safetensors")]) == 0
    capsys.readouterr()
    assert run("klvae", ["decode", "--model", model, str(tmp_path / "z.safetensors"), "--out", str(photos)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"klvae decode: error: --out {str(photos)!r} already holds im0.png"), err
    assert _same_files(photos, before)  # before the fix: both photos replaced by their decodes


# ------------------------------------------------------------------------------------------------ disk full


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder on a full disk: a tiny tmpfs filled to the last byte when we may mount one (root), else a folder
    whose writers raise ENOSPC (simulated)."""
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(folder)],
                                                  capture_output=True).returncode == 0
    try:
        if mounted:
            _fill(folder)
        else:
            _simulate_full(folder, monkeypatch)
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def _fill(folder) -> None:
    """Write unbuffered until the file system refuses even one byte."""
    for i, size in enumerate((4096, 512, 1)):
        with open(folder / f"filler{i}", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as err:
                assert err.errno == errno.ENOSPC


def _simulate_full(folder, monkeypatch) -> None:
    import pathlib

    import safetensors.torch

    def refuse(path):
        if str(path).startswith(str(folder)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for owner, name, path_arg in ((Image.Image, "save", 1), (pathlib.Path, "write_text", 0), (safetensors.torch, "save_file", 1)):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _o=original, _i=path_arg, **k: refuse(a[_i]) or _o(*a, **k))


@pytest.mark.parametrize("command, argv, written", [
    ("klvae", ["decode", "--model", "{model}", "{w}/zeros.safetensors", "--out", "{full}"], "0000.png"),
    ("klvae", ["encode", "--model", "{model}", "{w}/photos", "-o", "{full}/z.safetensors"], "z.safetensors"),
    ("klvae", ["reconstruct", "--model", "{model}", "{w}/photos", "--out", "{full}"], "im0.png"),
    ("klvae-eval", ["--model", "{model}", "--data", "{w}/photos", "--metrics", "psnr", "--resolution", "32", "--output", "{full}"], "metrics.json"),
    ("klvae-stats", ["--model", "{model}", "--data", "{w}/photos", "--resolution", "32", "--output", "{full}"], "latent_stats.json"),
])
def test_full_disk_is_one_line_naming_the_file(work, full_disk, command, argv, written, capsys):
    argv = [a.format(model=work / "model", w=work, full=full_disk) for a in argv]
    assert run(command, argv) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].endswith(f"error: disk full while writing {full_disk / written}"), err
    assert not (full_disk / written).exists()  # no truncated file left to pass for a result


def test_torch_writer_on_a_full_disk_is_named(full_disk):
    # torch.save reports a full disk in C++ terms ("unexpected pos ...", "basic_ios::clear: iostream error")
    with pytest.raises(DiskFull, match=f"disk full while writing {full_disk / 'w.pt'}"):
        with writing(full_disk / "w.pt"):
            if os.path.ismount(full_disk):
                torch.save(torch.zeros(100_000), full_disk / "w.pt")
            else:
                raise RuntimeError("basic_ios::clear: iostream error")
    with pytest.raises(ValueError, match="unrelated"):  # other errors pass through unchanged
        with writing(full_disk / "x"):
            raise ValueError("unrelated")


def test_cuda_without_a_gpu_is_named(monkeypatch):
    from diffusers_klvae.eval_data import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available on this machine"):
        resolve_device("cuda")


@pytest.mark.parametrize("command", ["klvae-eval", "klvae-stats"])
def test_a_missing_source_fails_before_any_progress_bar(work, command, capsys):
    assert run(command, ["--model", str(work / "model"), "--data", str(work / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{command}: error: data "), err  # the whole of stderr: one line


def test_klvae_push_on_a_full_disk_says_so(work, full_disk, capsys):
    from diffusers_klvae import hub

    staged = full_disk / "staged"
    assert hub.main([str(work / "model"), "--repo-id", "me/x", "--dry-run", "--folder", str(staged)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0] == f"klvae-push: error: disk full while writing {staged}", err
