"""Encode/decode latency and peak working memory, KLVAE vs diffusers' AutoencoderKL with identical weights.

SD KL-f8 config, batch 1, fp32 on CPU. Each (model, op, size) runs in a fresh subprocess: one warm-up call, then
``--runs`` timed calls (median), while the kernel's peak-RSS counter (reset through ``/proc/self/clear_refs``
after loading) gives the working memory above the loaded model. Achieved GFLOP/s uses the op's FLOPs from
``torch.utils.flop_counter``; the machine's fp32 matmul GFLOP/s is measured in the same run for reference.

    python benchmarks/bench_model.py                      # 256² and 512², 3 runs each
    python benchmarks/bench_model.py --sizes 256 --runs 3  # a quick subset
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import _status, build, perturbed_state  # noqa: E402  (same model builder and memory method)


def op_input(op: str, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if op == "encode":
        return torch.rand(1, 3, size, size, generator=g) * 2 - 1
    return torch.randn(1, 4, size // 8, size // 8, generator=g)


def call(vae, op: str, x: torch.Tensor) -> torch.Tensor:
    return vae.encode(x).latent_dist.mean if op == "encode" else vae.decode(x).sample


def worker(spec: dict) -> dict:
    vae = build(spec["cls"], spec["weights"])
    x = op_input(spec["op"], spec["size"])
    with torch.no_grad():
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        call(vae, spec["op"], x)  # warm-up, also the memory measurement (first call allocates the most)
        peak = _status("VmHWM")
        times = []
        for _ in range(spec["runs"]):
            start = time.perf_counter()
            call(vae, spec["op"], x)
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "memory_gb": (peak - before) / 2**30}


def flops(op: str, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    vae = build("diffusers")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call(vae, op, op_input(op, size))
    return counter.get_total_flops()


def matmul_gflops(n: int = 2048, runs: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def measure(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    tmp = tempfile.TemporaryDirectory(prefix="bench_model-")  # 330 MB of weights, removed when main returns
    weights = os.path.join(tmp.name, "weights.safetensors")
    from safetensors.torch import save_file

    save_file(perturbed_state(), weights)
    peak = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul (2048³): {peak:.1f} GFLOP/s", flush=True)
    verdicts = []
    for size in args.sizes:
        for op in ("encode", "decode"):
            gflop = flops(op, size) / 1e9
            res = {cls: measure({"cls": cls, "weights": weights, "op": op, "size": size, "runs": args.runs}) for cls in ("klvae", "diffusers")}
            k, d = res["klvae"], res["diffusers"]
            for label, r in (("KLVAE", k), ("AutoencoderKL", d)):
                print(f"{label:14s} {op} {size}²: {r['seconds']:.3f} s ({gflop / r['seconds']:.1f} GFLOP/s of {gflop:.1f} GFLOP), "
                      f"working memory {r['memory_gb']:.3f} GB", flush=True)
            speed, memory = d["seconds"] / k["seconds"], k["memory_gb"] / d["memory_gb"]
            print(f"  KLVAE/AutoencoderKL {op} {size}²: speed {speed:.2f}x, memory {memory:.2f}x", flush=True)
            verdicts.append(f"{'PASS' if speed >= 1.0 else 'MISS'} {op} {size}² speed >= 1.0x AutoencoderKL: {speed:.2f}x")
            verdicts.append(f"{'PASS' if memory <= 1.0 else 'MISS'} {op} {size}² memory <= 1.0x AutoencoderKL: {memory:.2f}x")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
