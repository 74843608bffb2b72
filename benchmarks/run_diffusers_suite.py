"""diffusers' own AutoencoderKL test suite, run for AutoencoderKL and for KLVAE (the import swapped), with the counts.

Fetches nothing: point it at a diffusers checkout (a git clone, at the tag of the installed diffusers). The suite's
files are copied into a temporary folder, a copy of ``test_models_autoencoder_kl.py`` imports
``diffusers_klvae.KLVAE as AutoencoderKL``, and pytest runs both (one thread). Hub-only tests fail offline for both.

    python benchmarks/run_diffusers_suite.py /path/to/diffusers [--rev v0.42.1] [--file tests/models/...py]

An older unittest-style suite (e.g. ``--rev v0.38.0``) imports names newer diffusers dropped from its
``tests/testing_utils.py``; ``--helpers-rev`` takes ``tests/testing_utils.py`` and ``tests/conftest.py`` from another
revision (one that matches the installed diffusers).

Needs ``parameterized`` (and ``requests_mock`` for the older unittest-style suites); their absence is an error of the
run, reported as such, not a count.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SUITE = "tests/models/autoencoders/test_models_autoencoder_kl.py"
# what the suite imports, old (unittest + test_modeling_common) and new (testing_utils mixins) layouts alike
SUPPORT = ["tests/__init__.py", "tests/conftest.py", "tests/testing_utils.py", "tests/models/__init__.py",
           "tests/models/test_modeling_common.py", "tests/models/testing_utils", "tests/models/autoencoders/__init__.py",
           "tests/models/autoencoders/testing_utils.py", "tests/models/autoencoders/vae.py", "tests/others/__init__.py",
           "tests/others/test_utils.py"]
SWAP = ("from diffusers import AutoencoderKL\n", "from diffusers_klvae import KLVAE as AutoencoderKL\n")


def export(checkout: Path, rev: str | None, paths: list[str], dest: Path) -> None:
    """Copy ``paths`` of the checkout (at ``rev`` with git archive, else the working tree) into ``dest``."""
    if rev:
        present = subprocess.run(["git", "-C", str(checkout), "ls-tree", "-r", "--name-only", rev, "--", *paths],
                                 capture_output=True, text=True, check=True).stdout.split()
        archive = subprocess.run(["git", "-C", str(checkout), "archive", rev, *present], capture_output=True, check=True)
        subprocess.run(["tar", "x", "-C", str(dest)], input=archive.stdout, check=True)
        return
    for path in paths:
        source = checkout / path
        if source.exists():
            subprocess.run(["cp", "-r", "--parents", path, str(dest)], cwd=checkout, check=True)


def run(folder: Path, test_file: str) -> tuple[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                          cwd=folder, env=env, capture_output=True, text=True)
    out = done.stdout + done.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else "no output"
    failed = sorted(set(re.findall(r"^_{3,} (\S+) _{3,}$", out, flags=re.M)))
    return summary, ", ".join(failed) or "none"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a diffusers clone")
    parser.add_argument("--rev", help="git revision to read the tests at (default: the working tree)")
    parser.add_argument("--file", default=SUITE, help=f"the suite file (default: {SUITE})")
    parser.add_argument("--helpers-rev", help="revision of tests/testing_utils.py and tests/conftest.py (default: --rev)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="diffusers-suite-") as tmp:
        folder = Path(tmp)
        export(args.checkout, args.rev, [args.file, *SUPPORT], folder)
        if args.helpers_rev:
            export(args.checkout, args.helpers_rev, ["tests/testing_utils.py", "tests/conftest.py"], folder)
        suite = (folder / args.file).read_text()
        if SWAP[0] not in suite:
            raise SystemExit(f"{args.file} has no line {SWAP[0].strip()!r} to swap")
        swapped = Path(args.file).with_name("test_models_klvae.py")
        (folder / swapped).write_text(suite.replace(SWAP[0], SWAP[1]))
        for name, test_file in (("AutoencoderKL", args.file), ("KLVAE", str(swapped))):
            summary, failed = run(folder, test_file)
            print(f"{name:>13}: {summary}\n{'':>13}  failed: {failed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
