"""train_autoencoder.py end to end: arguments, exact resume after SIGKILL, 2 processes, decoder-only, EMA, bf16.

Runs use the ``tiny`` preset (f2) at 32x32 on the bundled photos, a few steps each, one CPU thread (the result of
a CPU run is bit-reproducible only at a fixed thread count), LPIPS with a random backbone (its value does not
matter here; the real weights are exercised by the demo and the benchmark).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import accelerate.utils
import pytest
import torch
from safetensors.torch import load_file

from diffusers_klvae import KLVAE, checkpoint_state, checkpoints, train_config, training
from diffusers_klvae.cli_support import DiskFull

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train_autoencoder.py"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def base_args(train_dir, output_dir, *extra) -> list[str]:
    return ["--preset", "tiny", "--train_data_dir", str(train_dir), "--resolution", "32", "--train_batch_size", "2",
            "--seed", "0", "--report_to", "none", "--lpips_weights", "random", "--output_dir", str(output_dir),
            "--num_validation_images", "1", *map(str, extra)]


def from_start(argv: list[str], start) -> list[str]:
    """Fine-tune a saved model instead of a fresh preset, so a test knows the starting weights."""
    i = argv.index("--preset")
    return argv[:i] + ["--pretrained_model_name_or_path", str(start)] + argv[i + 2:]


@pytest.fixture
def tiny_start(tmp_path) -> Path:
    torch.manual_seed(1)
    KLVAE.from_preset("tiny").save_pretrained(tmp_path / "start")
    return tmp_path / "start"


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture
def run_inprocess():
    """Call train_autoencoder.main(argv) in this process with 1 thread and a fresh Accelerate state."""
    sys.path.insert(0, str(ROOT))
    import train_autoencoder
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(argv):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return train_autoencoder.main(argv)

    yield run
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(threads)
    sys.path.remove(str(ROOT))


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / WEIGHTS)


def assert_identical(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


# ------------------------------------------------------------------------------------------------- arguments


def test_arguments_parse_into_frozen_config(photos_dir, tmp_path):
    cfg = train_config.parse_args(base_args(photos_dir, tmp_path, "--kl_scale", "1e-5", "--use_ema", "--mixed_precision", "bf16"))
    assert cfg.kl_weight == 1e-5  # the diffusers example's name is an alias of the losses' name
    assert cfg.use_ema and cfg.mixed_precision == "bf16" and cfg.resolution == 32 and cfg.preset == "tiny"
    with pytest.raises(Exception):
        cfg.resolution = 64  # frozen: nothing changes the config after parsing


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "33"], "multiple of the model's downsampling factor 2"),
        (["--preset", "huge"], "unknown preset 'huge'; available presets: kl-f8-16ch, sd-kl-f8, sdxl, small, tiny"),
        (["--image_column", "picture"], "image column 'picture' not in the dataset; its columns are ['image']"),
        (["--latent_mask_prob", "1.5"], "--latent_mask_prob must be in [0, 1]"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--hub_push_checkpoints"], "--hub_push_checkpoints needs --hub_model_id"),
        (["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf"),  # a NaN model, exit 0, before
        (["--kl_weight", "nan"], "--kl_weight must be a finite number, got nan"),
        (["--learning_rate", "-1"], "--learning_rate must be > 0, got -1.0"),
        (["--disc_weight", "-0.5"], "--disc_weight must be >= 0, got -0.5"),
        (["--lr_warmup_steps", "-1"], "--lr_warmup_steps must be >= 0, got -1"),
        (["--adam_beta1", "2"], "--adam_beta1 must be in [0, 1), got 2.0"),
        (["--shuffle_buffer_size", "0"], "--shuffle_buffer_size must be >= 1, got 0"),
        (["--hub_model_id", "bad id/"], "--hub_model_id must look like 'user/name' or 'name', got 'bad id/'"),
        (["--output_dir", __file__], f"--output_dir {__file__!r} exists and is not a folder"),
        (["--output_dir", Path(__file__).parent, "--logging_dir", "conftest.py"],
         "--logging_dir 'conftest.py' is a file in --output_dir, not a folder"),
    ],
)
def test_bad_arguments_fail_before_any_work(photos_dir, tmp_path, extra, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        train_config.parse_args(base_args(photos_dir, out, *extra))
    assert message in str(err.value)
    assert not out.exists()  # nothing was created


def test_a_pipeline_folder_is_checked_as_every_tool_loads_it(photos_dir, tmp_path):
    """--pretrained_model_name_or_path takes what loading.load_vae takes: a pipeline folder's vae/ is found."""
    KLVAE.from_preset("tiny").save_pretrained(tmp_path / "pipe" / "vae")
    argv = base_args(photos_dir, tmp_path / "out")
    del argv[argv.index("--preset"):argv.index("--preset") + 2]
    argv += ["--pretrained_model_name_or_path", str(tmp_path / "pipe")]
    assert train_config.parse_args(argv).pretrained_model_name_or_path == str(tmp_path / "pipe")
    with pytest.raises(ValueError, match="--resolution 33 must be a multiple of the model's downsampling factor 2"):
        train_config.parse_args(argv + ["--resolution", "33"])


def test_resolution_checked_against_f8_preset(photos_dir, tmp_path):
    with pytest.raises(ValueError, match="--resolution 100 must be a multiple of the model's downsampling factor 8"):
        train_config.parse_args(base_args(photos_dir, tmp_path, "--preset", "small", "--resolution", "100"))


def test_script_exits_with_one_line_error(photos_dir, tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *base_args(photos_dir, tmp_path, "--resolution", "31")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_.value.code == 2  # a user error, as every klvae command
    err = capsys.readouterr().err
    assert err.startswith("train_autoencoder.py: error: --resolution 31 must be a multiple of") and err.count("\n") == 1


def run_script(argv, monkeypatch, capsys) -> str:
    """train_autoencoder.py as a command: exit status 2 and one line on stderr (no traceback); returns that line."""
    import runpy

    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("train_autoencoder.py: error: "), err
    return err


def test_argparse_errors_are_one_line_too(photos_dir, tmp_path, monkeypatch, capsys):
    err = run_script(base_args(photos_dir, tmp_path, "--lr_scheduler", "bogus"), monkeypatch, capsys)
    assert "argument --lr_scheduler/--lr-scheduler: invalid choice: 'bogus'" in err  # no 60-line usage block first


def test_a_folder_of_other_files_is_refused_and_left_alone(photos_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    err = run_script(base_args(photos_dir, out), monkeypatch, capsys)
    assert f"--output_dir {out} is not empty and no training run started there (it holds README.md)" in err
    assert (out / "README.md").read_text() == "my notes" and not (out / "training_args.json").exists()


def test_runtime_user_errors_are_one_line(photos_dir, tmp_path, monkeypatch, capsys):
    """Errors found after parsing (the data, a checkpoint) end as every command's do: one line, exit 2."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not a jpeg")
    err = run_script(base_args(bad, tmp_path / "out1", "--num_validation_images", "1"), monkeypatch, capsys)
    assert "no decodable image" in err
    err = run_script(base_args(photos_dir, tmp_path / "out2", "--resume_from_checkpoint", str(bad)), monkeypatch, capsys)
    assert f"{bad} is not a complete checkpoint-<step> folder" in err
    (bad / "config.json").write_text('{"block_out_channels": [8,')  # a model folder with a cut config
    err = run_script(from_start(base_args(photos_dir, tmp_path / "out3"), bad), monkeypatch, capsys)
    assert "config.json" in err and "not a valid JSON file" in err
    (bad / "shard.parquet").write_bytes(b"PAR1 cut short")  # datasets logs its own error line before raising
    argv = base_args(photos_dir, tmp_path / "out4")
    at = argv.index("--train_data_dir")
    del argv[at:at + 2]
    err = run_script(argv + ["--data_files", str(bad / "shard.parquet")], monkeypatch, capsys)
    assert f"cannot read the training data ({bad / 'shard.parquet'}): " in err


@pytest.mark.parametrize("content, message", [(b"", "empty file"), (b"garbage\n", "truncated header"),
                                              ("cut", "unexpected end of data")])
def test_a_corrupt_tar_shard_is_named_in_one_line(photos_dir, photo_paths, tmp_path, content, message):
    """An empty, garbage or truncated webdataset shard: tarfile's ReadError was a traceback."""
    import tarfile

    shard = tmp_path / "bad.tar"
    if content == "cut":
        with tarfile.open(tmp_path / "whole.tar", "w") as tar:
            for path in photo_paths[:2]:
                tar.add(path, arcname=path.name)
        content = (tmp_path / "whole.tar").read_bytes()[:len(photo_paths[0].read_bytes()) // 2]
    shard.write_bytes(content)
    argv = base_args(photos_dir, tmp_path / "out")
    at = argv.index("--train_data_dir")
    with pytest.raises(ValueError, match=re.escape(f"cannot read the training data ({shard}): {message}")):
        train_config.parse_args(argv[:at] + argv[at + 2:] + ["--data_files", str(shard)])


@pytest.mark.parametrize("as_folder", [False, True])
def test_a_model_config_that_is_not_a_json_object_is_named_in_one_line(photos_dir, tmp_path, as_folder):
    config = tmp_path / "cfg" / "config.json"
    config.parent.mkdir()
    config.write_text("[1, 2]")  # was a TypeError traceback from dict()
    argv = [a for a in base_args(photos_dir, tmp_path / "out") if a not in ("--preset", "tiny")]
    given = config.parent if as_folder else config
    with pytest.raises(ValueError, match=re.escape(f"{str(config)!r} is not a JSON object: expected a diffusers model config")):
        train_config.parse_args(argv + ["--model_config_name_or_path", str(given)])
    with pytest.raises(ValueError, match="is not a JSON object"):
        training.build_vae(model_config_name_or_path=str(given))


# ------------------------------------------------------------------------------------------------- resume


def test_a_checkpoint_of_another_model_or_a_corrupt_one_is_named_in_one_line(photos_dir, tmp_path, run_inprocess,
                                                                               monkeypatch, capsys):
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path / "run"
    run_inprocess(base_args(photos_dir, out, "--max_train_steps", "1", "--perceptual_weight", "0"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    capsys.readouterr()  # the first run's progress bar
    resume = base_args(photos_dir, out, "--max_train_steps", "2", "--perceptual_weight", "0", "--resume_from_checkpoint", "latest")
    other_model = [("small" if a == "tiny" else a) for a in resume]
    err = run_script(other_model, monkeypatch, capsys)  # was a 137-line size-mismatch traceback
    assert "checkpoint-1/vae/diffusion_pytorch_model.safetensors does not fit the model of this run" in err
    AcceleratorState._reset_state(True)
    (out / "checkpoint-1" / "custom_checkpoint_0.pkl").write_bytes(os.urandom(64))
    err = run_script(resume, monkeypatch, capsys)
    assert "custom_checkpoint_0.pkl is corrupt or holds more than tensors and plain values" in err


def test_a_checkpoint_past_the_end_is_refused():
    checkpoints.check_resume_step(Path("run/checkpoint-2"), 2)  # the final step's: may redo the final save
    with pytest.raises(ValueError, match="checkpoint-2 is past --max_train_steps 1: raise --max_train_steps"):
        checkpoints.check_resume_step(Path("run/checkpoint-2"), 1)


@pytest.mark.parametrize("marker, has", [({"num_processes": 1}, "no step"), ({"num_processes": 1, "step": "x"}, "step 'x'"),
                                         ({"num_processes": 1, "step": 5}, "step 5")])
def test_a_marker_without_the_checkpoints_step_is_a_problem(tmp_path, marker, has):
    """A marker without a usable step was a KeyError/TypeError in the middle of a resume (after newer checkpoints were
    moved aside); now `latest` skips it and a named one is refused before anything happens."""
    bad = tmp_path / "checkpoint-2"
    bad.mkdir()
    (bad / checkpoints.CHECKPOINT_MARKER).write_text(json.dumps(marker))
    problem = f"training_state.json has {has}, expected 2 (the folder's number)"
    assert checkpoints.checkpoint_problem(bad) == problem
    assert checkpoints.find_latest_checkpoint(tmp_path) is None
    with pytest.raises(ValueError, match=re.escape(f"cannot resume from {bad}: {problem}")):
        checkpoints.resolve_resume_path(str(bad), tmp_path)


def test_exact_resume_after_sigkill(photos_dir, tmp_path, run_inprocess):
    """6 steps straight == steps until a checkpoint, SIGKILL, resume from `latest` (bit-identical weights),
    even with a half-written checkpoint left behind. GAN on from step 2, EMA, masks and a cosine schedule on."""
    args = ["--max_train_steps", "6", "--checkpointing_steps", "2", "--validation_steps", "3", "--disc_start", "2",
            "--use_ema", "--latent_mask_prob", "0.5", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
            "--perceptual_weight", "0"]  # LPIPS is frozen and deterministic; skipping it keeps this test short
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    proc = subprocess.Popen([sys.executable, str(SCRIPT), *base_args(photos_dir, killed, *args)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 150
    while checkpoints.find_latest_checkpoint(killed) is None:
        assert proc.poll() is None, f"training ended before a checkpoint was written:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 150 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first = checkpoints.find_latest_checkpoint(killed)
    assert checkpoints.checkpoint_step(first) < 6

    # what a kill during a save leaves: a temp folder and a checkpoint folder without its marker
    shutil.copytree(first, killed / ".tmp-checkpoint-8")
    shutil.copytree(first, killed / "checkpoint-9")
    (killed / "checkpoint-9" / checkpoints.CHECKPOINT_MARKER).unlink()
    assert checkpoints.find_latest_checkpoint(killed) == first

    run_inprocess(base_args(photos_dir, killed, *args, "--resume_from_checkpoint", "latest"))
    run_inprocess(base_args(photos_dir, straight, *args))

    assert_identical(weights(straight), weights(killed), "raw weights")
    ema_file = "diffusion_pytorch_model.ema.safetensors"
    assert_identical(load_file(straight / ema_file), load_file(killed / ema_file), "EMA weights")
    assert_identical(weights(straight / "checkpoint-6" / "discriminator"), weights(killed / "checkpoint-6" / "discriminator"), "discriminator")
    assert not (killed / ".tmp-checkpoint-8").exists()  # stale temp folders are cleaned at the next save
    history = json.loads((killed / "checkpoint-6" / checkpoints.CHECKPOINT_MARKER).read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]  # the loss curve survives the kill
    # GAN terms from disc_start: the update that starts with 2 steps done is the 3rd (history counts steps done)
    assert "d_loss" not in history[1] and history[1]["g"] == 0 and history[2]["d_loss"] > 0


# ------------------------------------------------------------------------------------------------- scale-out


def test_two_processes_sync_weights_and_split_data(photos_dir, tmp_path, tiny_start):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000), str(SCRIPT),
           *from_start(base_args(photos_dir, out, "--train_batch_size", "1", "--max_train_steps", "2", "--checkpointing_steps", "2",
                                 "--disc_start", "1", "--center_crop", "--debug_process_logs", "--learn_logvar"), tiny_start)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]

    w0, w1 = load_file(out / "weights-0.safetensors"), load_file(out / "weights-1.safetensors")
    assert "loss.0" in w0 and w0["loss.0"] != 0  # the learned logvar: outside DDP, its gradient is averaged by hand
    assert_identical(w0, w1, "replicas")  # gradients were averaged: both processes hold the same VAE and logvar
    start = weights(tiny_start)
    assert any(not torch.equal(w0[k], start[k]) for k in start)  # and it trained
    seen = [(out / f"seen_images-{r}.txt").read_text().split() for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 2
    assert not set(seen[0]) & set(seen[1])  # each process read its own shard
    ckpt = checkpoints.find_latest_checkpoint(out)
    # every process saved its own data position, generator and RNG states
    streams = torch.load(checkpoints.registered_state_file(ckpt, "data_stream"), weights_only=True)["processes"]
    assert [s["process_index"] for s in streams] == [0, 1]
    generators = torch.load(checkpoints.registered_state_file(ckpt, "generator"), weights_only=True)["processes"]
    assert len(generators) == 2 and not torch.equal(generators[0]["state"], generators[1]["state"])
    for r in (0, 1):
        assert (ckpt / f"random_states_{r}.pkl").is_file()


# ------------------------------------------------------------------------------------------------- options


def test_decoder_only_leaves_encoder_bit_identical(photos_dir, tmp_path, run_inprocess, tiny_start):
    out = tmp_path / "dec"
    run_inprocess(from_start(base_args(photos_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--disc_start", "1",
                                       "--decoder_only", "--learning_rate", "1e-3", "--perceptual_weight", "0"), tiny_start))
    before, after = weights(tiny_start), weights(out)
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith("decoder.")]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("conv_out.weight"))
    opt = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)  # Accelerate's name for the VAE's
    n_trainable = sum(1 for k in before if k.startswith(("decoder.", "post_quant_conv.")))
    assert len(opt["param_groups"][0]["params"]) == n_trainable  # the frozen part is not even in the optimizer


def test_ema_is_what_validation_used_and_checkpoints_are_pruned(photos_dir, photo_paths, tmp_path, run_inprocess):
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    for p in photo_paths:
        shutil.copy(p, train_dir / p.name)
    (train_dir / "broken.jpg").write_bytes(photo_paths[0].read_bytes()[:300])  # truncated JPEG
    (train_dir / "notes.png").write_text("not an image")
    val_paths = [str(photo_paths[1]), str(photo_paths[2])]
    out = tmp_path / "ema"
    result = run_inprocess(base_args(train_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "1",
                                     "--checkpoints_total_limit", "2", "--validation_steps", "2", "--use_ema",
                                     "--learning_rate", "1e-3", "--perceptual_weight", "0", "--disc_start", "100",
                                     "--validation_images", *val_paths))
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert result["skipped"] >= 2  # the truncated JPEG and the text file were skipped and counted, not fatal

    raw, ema = KLVAE.from_pretrained(out), KLVAE.from_pretrained(out, variant="ema")
    assert any(not torch.equal(a, b) for a, b in zip(raw.state_dict().values(), ema.state_dict().values()))
    from diffusers import AutoencoderKL

    # the one layout: the last checkpoint's vae/ is the final folder (raw + "ema" variant), plain diffusers loads it
    for variant, final in ((None, raw), ("ema", ema)):
        saved = AutoencoderKL.from_pretrained(out / "checkpoint-4" / "vae", variant=variant).state_dict()
        assert_identical(saved, final.state_dict(), f"checkpoint-4/vae ({variant or 'raw'})")
    from diffusers_klvae.data import load_validation_images
    from diffusers_klvae.evaluation import psnr, reconstruct
    from diffusers_klvae.imaging import to_uint8

    images = load_validation_images(val_paths, resolution=32).pixel_values
    score = lambda vae: float(psnr(to_uint8(images), to_uint8(reconstruct(vae.eval(), images))).mean())  # noqa: E731
    logged = [json.loads(line) for line in (out / "validation" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [2, 4] and logged[-1]["weights"] == "ema"
    assert logged[-1]["psnr"] == pytest.approx(score(ema), abs=1e-9)
    assert abs(logged[-1]["psnr"] - score(raw)) > 1e-6
    assert (out / "validation" / "step-0000004.png").is_file() and (out / "loss_curve.png").is_file()
    assert "---" in (out / "README.md").read_text()[:10]  # a model card with YAML metadata
    args = json.loads((out / "training_args.json").read_text())  # what klvae-push --training-args reads
    assert args["max_train_steps"] == 4 and args["output_dir"] == str(out) and args["validation_images"] == list(map(str, val_paths))


def test_bf16_mixed_precision_keeps_fp32_master_weights(photos_dir, tmp_path, run_inprocess, tiny_start):
    out = tmp_path / "bf16"
    run_inprocess(from_start(base_args(photos_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--disc_start", "1",
                                       "--mixed_precision", "bf16", "--learning_rate", "1e-3"), tiny_start))
    final = weights(out)
    assert {t.dtype for t in final.values()} == {torch.float32}
    assert {t.dtype for t in weights(out / "checkpoint-2" / "discriminator").values() if t.is_floating_point()} == {torch.float32}
    opt = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)  # the VAE's
    assert {s["exp_avg"].dtype for s in opt["state"].values()} == {torch.float32}
    start = weights(tiny_start)
    assert all(not torch.equal(final[k], start[k]) for k in start if k.endswith("conv_out.weight"))
    history = json.loads((out / "checkpoint-2" / checkpoints.CHECKPOINT_MARKER).read_text())["history"]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


# ------------------------------------------------------------------------------------------------- the step


def test_train_step_updates_discriminator_only_after_disc_start():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from diffusers_klvae.discriminator import NLayerDiscriminator
    from diffusers_klvae.losses import KLVAELoss

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator()
    vae, disc = KLVAE.from_preset("tiny"), NLayerDiscriminator(ndf=8)
    loss_fn = KLVAELoss(discriminator=disc, perceptual_weight=0.0, disc_start=1)
    opts = training.build_optimizers(vae, disc, learning_rate=1e-3, disc_learning_rate=1e-3)
    vae, disc, *opts = accelerator.prepare(vae, disc, *opts)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    g = torch.Generator().manual_seed(0)
    snapshot = lambda m: {k: v.clone() for k, v in m.state_dict().items()}  # noqa: E731

    vae0, disc0 = snapshot(vae), snapshot(disc)
    logs = training.train_step(accelerator, vae, disc, loss_fn, opts, x, 0, generator=g)
    assert "d_loss" not in logs and logs["g"] == 0.0
    assert all(torch.equal(v, disc0[k]) for k, v in disc.state_dict().items())  # no D forward, no D update
    assert any(not torch.equal(v, vae0[k]) for k, v in vae.state_dict().items())
    assert all(p.grad is None for p in [*vae.parameters(), *disc.parameters()])  # zeroed with set_to_none

    disc1 = snapshot(disc)
    logs = training.train_step(accelerator, vae, disc, loss_fn, opts, x, 1, generator=g)
    assert logs["d_loss"] > 0 and logs["d_weight"] > 0
    assert any(not torch.equal(v, disc1[k]) for k, v in disc.state_dict().items() if k.endswith("weight"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_mask_batch_holes_agree_between_latents_and_target():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    g = torch.Generator().manual_seed(0)
    latent_mask, target = training.mask_batch(x, factor=8, prob=1.0, kind="boxes", generator=g)
    assert latent_mask.shape == (4, 1, 4, 4)
    pixel = latent_mask.repeat_interleave(8, -2).repeat_interleave(8, -1)  # each latent cell covers 8x8 pixels
    assert torch.equal(target, x * pixel)  # holes are 0 (mid-gray) exactly where the latent is dropped
    assert ((latent_mask == 0).flatten(1).any(1)).all()  # every image got a hole
    assert training.mask_batch(x, factor=8, prob=0.0, generator=g) == (None, None)


def test_push_to_hub_and_checkpoint_pushes_go_through_hub_api(photos_dir, tmp_path, run_inprocess, tiny_start, monkeypatch):
    """--push_to_hub publishes the final folder in one commit; --hub_push_checkpoints uploads each checkpoint
    (on the client's worker thread); a recording stand-in replaces the network."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs.get("private")))
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, **kwargs):
            calls.append(("upload_folder", repo_id, path_in_repo, sorted(p.name for p in Path(folder_path).iterdir())))
            return SimpleNamespace(commit_url=f"https://hf.co/{repo_id}/commit/{len(calls)}")

        def run_as_future(self, fn, *args, **kwargs):
            future = Future()
            future.set_result(fn(*args, **kwargs))
            return future

    sys.path.insert(0, str(ROOT))
    import train_autoencoder

    monkeypatch.setattr(train_autoencoder, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)  # never written anywhere
    out = tmp_path / "push"
    run_inprocess(from_start(base_args(photos_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--use_ema",
                                       "--perceptual_weight", "0", "--push_to_hub", "--hub_model_id", "me/my-vae",
                                       "--hub_push_checkpoints"), tiny_start))
    uploads = [c for c in calls if c[0] == "upload_folder"]
    assert [u[2] for u in uploads] == ["checkpoints/checkpoint-1", "checkpoints/checkpoint-2", None]
    assert "training_state.json" in uploads[0][3]
    final = uploads[-1][3]
    assert {"config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.ema.safetensors", "README.md"} <= set(final)
    assert "my-vae.safetensors" not in final  # the tiny preset has no original-layout single file (ComfyUI would misread it)
    assert "hf_xxxx" not in (out / "README.md").read_text()


# ------------------------------------------------------------------------------------------------- the output folder


def quick_args(photos_dir, out, *extra):
    return base_args(photos_dir, out, "--perceptual_weight", "0", "--disc_start", "100", *extra)


def test_second_run_on_a_busy_folder_refuses_with_the_holders_pid(photos_dir, tmp_path, run_inprocess):
    out = tmp_path / "busy"
    out.mkdir()
    with checkpoints.output_dir_lock(out):  # what a running training holds
        with pytest.raises(checkpoints.OutputDirError, match=rf"in use by another training run \(pid {os.getpid()}\)"):
            run_inprocess(quick_args(photos_dir, out, "--max_train_steps", "1"))
    assert sorted(p.name for p in out.iterdir()) == [".train.lock"]  # nothing written, nothing lost
    run_inprocess(quick_args(photos_dir, out, "--max_train_steps", "1"))  # the lock goes with its holder


def test_new_run_refuses_a_folder_with_an_earlier_run(photos_dir, tmp_path, run_inprocess):
    out = tmp_path / "earlier"
    run_inprocess(quick_args(photos_dir, out, "--max_train_steps", "1"))
    before = weights(out)
    with pytest.raises(checkpoints.OutputDirError, match="holds an earlier run .*--resume_from_checkpoint latest"):
        run_inprocess(quick_args(photos_dir, out, "--max_train_steps", "2", "--seed", "1"))
    assert_identical(weights(out), before, "the earlier run's model")


def test_latest_falls_back_past_a_checkpoint_without_weights(photos_dir, tmp_path, run_inprocess):
    out = tmp_path / "fallback"
    run_inprocess(quick_args(photos_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    (out / "checkpoint-2" / "vae" / "diffusion_pytorch_model.safetensors").unlink()  # marked complete, weights gone
    assert checkpoints.find_latest_checkpoint(out) == out / "checkpoint-1"
    with pytest.raises(ValueError, match="cannot resume from .*checkpoint-2: missing vae/diffusion_pytorch_model"):
        checkpoints.resolve_resume_path(str(out / "checkpoint-2"), out)
    (out / "checkpoint-1" / checkpoints.CHECKPOINT_MARKER).write_text("{not json")
    assert checkpoints.find_latest_checkpoint(out) is None  # a corrupt marker is skipped too, not a JSONDecodeError
    with pytest.raises(ValueError, match="no usable checkpoint in .*checkpoint-1: unreadable training_state.json"):
        checkpoints.resolve_resume_path("latest", out)  # not "holds an earlier run: pass --resume_from_checkpoint latest"


def test_a_checkpoint_pickle_holding_objects_is_refused_before_accelerate_unpickles_it(tmp_path):
    torch.save({"processes": [{"offset": 3}]}, tmp_path / "custom_checkpoint_0.pkl")  # what we write: plain values
    checkpoint_state._refuse_unsafe_pickles(tmp_path)
    torch.save({"processes": [Path("x")]}, tmp_path / "custom_checkpoint_1.pkl")  # any other object: refused
    with pytest.raises(ValueError, match="custom_checkpoint_1.pkl is corrupt or holds more than tensors and plain values"):
        checkpoint_state._refuse_unsafe_pickles(tmp_path)


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(photos_dir, tmp_path, run_inprocess):
    out = tmp_path / "rollback"
    run_inprocess(quick_args(photos_dir, out, "--max_train_steps", "3", "--checkpointing_steps", "1", "--validation_steps", "1"))
    abandoned = weights(out / "checkpoint-3" / "vae")
    run_inprocess(quick_args(photos_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "1",
                             "--resume_from_checkpoint", str(out / "checkpoint-1")))
    aside = list(out.glob("abandoned-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-2", "checkpoint-3", "validation"]
    assert_identical(weights(aside[0] / "checkpoint-3" / "vae"), abandoned, "the abandoned checkpoint (moved, not deleted)")
    assert checkpoints.find_latest_checkpoint(out) == out / "checkpoint-2"  # `latest` continues the new run

    # the abandoned branch's validation goes with its checkpoints: one metrics line per step of the run that goes on
    def steps(folder):
        return [json.loads(line)["step"] for line in (folder / "validation" / "metrics.jsonl").read_text().splitlines()]

    assert steps(out) == [1, 2] and steps(aside[0]) == [2, 3]  # was [1, 2, 3, 2] here
    assert sorted(p.name for p in (aside[0] / "validation").glob("*.png")) == ["step-0000002.png", "step-0000003.png"]
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == ["step-0000001.png", "step-0000002.png"]


def test_a_refused_resume_moves_nothing_aside_and_writes_nothing(photos_dir, tmp_path, run_inprocess):
    out = tmp_path / "refused"
    argv = ["--max_train_steps", "3", "--checkpointing_steps", "1", "--learning_rate", "1e-3"]
    run_inprocess(quick_args(photos_dir, out, *argv))
    before, args = sorted(p.name for p in out.iterdir()), (out / "training_args.json").read_text()
    resume = ["--resume_from_checkpoint", out / "checkpoint-1"]
    # the checkpoint cannot continue this run once loaded: checkpoint-2 and -3 had already been moved aside
    with pytest.raises(ValueError, match="--use_ema but .*checkpoint-1 was saved without EMA"):
        run_inprocess(quick_args(photos_dir, out, *argv, *resume, "--use_ema"))
    # the restored optimizer and scheduler keep their own rate: a new one was ignored, yet recorded as the run's
    with pytest.raises(ValueError, match=re.escape(f"--learning_rate 0.01 differs from the 0.001 of the run saved in "
                                                   f"{out / 'checkpoint-1'}, whose optimizer state a resume restores: "
                                                   "pass --learning_rate 0.001 to continue that run")):
        run_inprocess(quick_args(photos_dir, out, *argv[:-1], "1e-2", *resume))
    with pytest.raises(ValueError, match=re.escape("--adam_beta1 0.6 differs from the 0.5 of the run saved in")):
        run_inprocess(quick_args(photos_dir, out, *argv, *resume, "--adam_beta1", "0.6"))
    with pytest.raises(ValueError, match=re.escape("--learning_rate 0.002 and --adam_epsilon 1e-06 differs from the "
                                                   "0.001 and 1e-08 of the run saved in")):  # every flag at once
        run_inprocess(quick_args(photos_dir, out, *argv[:-1], "2e-3", *resume, "--adam_epsilon", "1e-6"))
    with pytest.raises(ValueError, match=r"optimizer state in .*checkpoint-1 does not fit this run's trainable "
                                         r"parameters: was it saved with another --decoder_only or --learn_logvar\?"):
        run_inprocess(quick_args(photos_dir, out, *argv, *resume, "--decoder_only"))  # was torch's bare message
    assert sorted(p.name for p in out.iterdir()) == before and (out / "training_args.json").read_text() == args


def test_resuming_another_folders_checkpoint_over_an_earlier_run_is_refused(photos_dir, tmp_path, run_inprocess):
    other, out, new = tmp_path / "other", tmp_path / "earlier", tmp_path / "new"
    run_inprocess(quick_args(photos_dir, other, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    run_inprocess(quick_args(photos_dir, out, "--max_train_steps", "1"))
    before, args = weights(out), (out / "training_args.json").read_text()
    foreign = ["--max_train_steps", "2", "--resume_from_checkpoint", other / "checkpoint-1"]
    with pytest.raises(checkpoints.OutputDirError, match=re.escape(
            f"--output_dir {out} holds an earlier run (checkpoint-1, config.json), which resuming {other / 'checkpoint-1'} "
            "there would replace: choose another --output_dir")):
        run_inprocess(quick_args(photos_dir, out, *foreign))  # was: exit 0, this run's model and arguments replaced
    assert_identical(weights(out), before, "the earlier run's model")
    assert (out / "training_args.json").read_text() == args
    run_inprocess(quick_args(photos_dir, new, *foreign))  # a new folder may continue that run
    assert checkpoints.find_latest_checkpoint(new) == new / "checkpoint-2"


def test_a_killed_runs_validation_counts_as_an_earlier_run(photos_dir, tmp_path, run_inprocess):
    """A run killed before its first checkpoint leaves validation/ (and logs/): a new run would overwrite its grids
    and append to its metrics.jsonl."""
    out = tmp_path / "killed"
    out.mkdir()
    (out / "training_args.json").write_text("{}")
    (out / ".tmp-checkpoint-4").mkdir()  # a kill mid-save: removed at the next save
    checkpoints.check_no_earlier_run(out)  # a run started and wrote nothing else: it may start again
    (out / "validation").mkdir()
    (out / "validation" / "metrics.jsonl").write_text('{"step": 2}\n')
    with pytest.raises(checkpoints.OutputDirError, match=re.escape(
            f"--output_dir {out} holds the outputs of an earlier run that saved no checkpoint (validation): nothing to "
            "resume; move them away or choose another --output_dir")):
        run_inprocess(quick_args(photos_dir, out, "--max_train_steps", "2", "--validation_steps", "1"))
    assert (out / "validation" / "metrics.jsonl").read_text() == '{"step": 2}\n'


def test_learned_logvar_trains_and_resumes_exactly(photos_dir, tmp_path, run_inprocess):
    """--learn_logvar: the VAE's optimizer moves logvar, and a resume restores it (and its Adam state) exactly."""
    from diffusers_klvae.checkpoints import registered_state_file

    def logvar(checkpoint) -> torch.Tensor:
        return torch.load(registered_state_file(checkpoint, "loss_parameters"), weights_only=True)["params"][0]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    argv = ["--max_train_steps", "3", "--checkpointing_steps", "1", "--learn_logvar", "--learning_rate", "1e-2"]
    run_inprocess(quick_args(photos_dir, straight, *argv))
    assert logvar(straight / "checkpoint-1") != 0 and logvar(straight / "checkpoint-3") != logvar(straight / "checkpoint-1")
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    run_inprocess(quick_args(photos_dir, resumed, *argv, "--resume_from_checkpoint", "latest"))
    assert torch.equal(logvar(resumed / "checkpoint-3"), logvar(straight / "checkpoint-3"))
    assert_identical(weights(resumed / "checkpoint-3" / "vae"), weights(straight / "checkpoint-3" / "vae"), "VAE after resume")


def test_resume_without_ema_leaves_no_stale_ema_file(photos_dir, tmp_path, run_inprocess):
    out = tmp_path / "no-ema"
    run_inprocess(quick_args(photos_dir, out, "--max_train_steps", "1", "--use_ema"))
    assert (out / "diffusion_pytorch_model.ema.safetensors").is_file()
    run_inprocess(quick_args(photos_dir, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"))
    assert not (out / "diffusion_pytorch_model.ema.safetensors").exists()


def test_a_kill_during_the_final_save_keeps_the_cards_metrics(photos_dir, tmp_path, run_inprocess):
    out = tmp_path / "final"
    run_inprocess(quick_args(photos_dir, out, "--max_train_steps", "2", "--validation_steps", "2"))
    card = (out / "README.md").read_text()
    assert "PSNR" in card
    for name in ("README.md", "config.json", "diffusion_pytorch_model.safetensors"):  # the final save, cut short
        (out / name).unlink()
    run_inprocess(quick_args(photos_dir, out, "--max_train_steps", "2", "--validation_steps", "2", "--resume_from_checkpoint", "latest"))
    metric_lines = [line for line in card.splitlines() if "PSNR" in line or "psnr" in line]
    assert metric_lines and set(metric_lines) <= set((out / "README.md").read_text().splitlines())


@pytest.fixture
def small_disk(tmp_path):
    """An 18 MB tmpfs: room for the first checkpoint of a tiny run (~12 MB, mostly the discriminator), not a second."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=18m", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_previous_checkpoint(photos_dir, tmp_path, small_disk, run_inprocess):
    out = small_disk / "run"
    result = subprocess.run([sys.executable, str(SCRIPT), *quick_args(photos_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                                                                      "--num_validation_images", "0")],
                            capture_output=True, text=True, env=subprocess_env(), timeout=240)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"train_autoencoder.py: error: disk full while writing {out / 'checkpoint-2'}", result.stderr[-3000:]
    assert checkpoints.find_latest_checkpoint(out) == out / "checkpoint-1"  # intact: every file there
    assert not list(out.glob(".tmp-*"))  # the half-written one was removed, giving its space back

    moved = tmp_path / "run"  # resumable: on a disk with room, it continues to the end
    shutil.copytree(out, moved)
    run_inprocess(quick_args(photos_dir, moved, "--max_train_steps", "2", "--checkpointing_steps", "1", "--num_validation_images", "0",
                             "--resume_from_checkpoint", "latest"))
    assert checkpoints.find_latest_checkpoint(moved) == moved / "checkpoint-2"


def test_a_full_disk_ends_every_process_of_a_two_process_run(photos_dir, small_disk):
    """One process failing to write a checkpoint must not leave the others waiting at a barrier: every process
    ends with the one-line error and exit status 2, and the previous checkpoint stays intact."""
    out = small_disk / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + (os.getpid() + 500) % 1000), "--tee", "2",
           "--log-line-prefix-template", "[rank${rank}]:", str(SCRIPT),
           *quick_args(photos_dir, out, "--train_batch_size", "1", "--max_train_steps", "2", "--checkpointing_steps", "1",
                       "--num_validation_images", "0")]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                           start_new_session=True)  # its own process group: a hung run is killed whole below
    try:
        _, stderr = run.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        _, stderr = run.communicate()
        pytest.fail(f"the 2-process run hung after the disk filled: {stderr[-3000:]}")
    line = f"train_autoencoder.py: error: disk full while writing {out / 'checkpoint-2'}"
    for rank in (0, 1):  # a whole line, maybe after the main process's unterminated progress bar
        assert re.search(rf"\[rank{rank}\]:{re.escape(line)}$", stderr, re.MULTILINE), stderr[-4000:]
    # torchrun's report: exit status 2; a rank still tearing down when the other has exited may be SIGTERMed by
    # torchrun itself (-15), after its error line above
    codes = re.findall(r"exitcode\s+:\s*(-?\d+) \(pid", stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, stderr[-4000:]
    assert run.returncode != 0
    assert checkpoints.find_latest_checkpoint(out) == out / "checkpoint-1"  # intact: every file there
    assert not list(out.glob(".tmp-*"))


@pytest.mark.parametrize("other", [(1, True, "disk full while writing X"), (1, False, "Permission denied: 'X'")])
def test_a_failure_on_another_process_fails_this_one_too(tmp_path, monkeypatch, other):
    """``write_together``: a process whose own part succeeded learns of the other's failure (one collective, here
    its result) and raises too, after removing the temporary folder; a full disk reads as a full disk."""
    tmp = tmp_path / ".tmp-checkpoint-2"
    tmp.mkdir()
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: [*mine, other])
    main = SimpleNamespace(process_index=0, is_main_process=True, wait_for_everyone=lambda: None)
    with pytest.raises(DiskFull if other[1] else RuntimeError) as err:
        checkpoints.write_together(main, tmp_path / "checkpoint-2", lambda: None, cleanup=lambda: shutil.rmtree(tmp))
    expected = f"disk full while writing {tmp_path / 'checkpoint-2'}" if other[1] else "process 1 failed while writing"
    assert expected in str(err.value) and not tmp.exists()
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: [*mine, None])  # nobody failed: no error
    checkpoints.write_together(main, tmp_path / "checkpoint-2", None)
