"""What the package's commands share: every user error is one line ``PROG: error: WHAT WAS EXPECTED`` on stderr,
exit status 2, no traceback; a full disk names the file being written (:func:`writing`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

EXIT_USAGE = 2  # argparse's exit code for bad input; used for every user error
# what a full disk looks like when the writer is not Python's: torch.save (C++ streams: "basic_ios::clear: iostream
# error", or "unexpected pos" from its zip writer) and safetensors (Rust: "No space left on device (os error 28)")
_DISK_FULL_TEXTS = ("basic_ios::clear", "iostream error", "No space left on device", "os error 28")
_NEARLY_FULL_BYTES = 1 << 20  # a write that failed for an unstated reason on a disk with less than this left: full


class DiskFull(OSError):
    """The disk filled up while writing ``path``."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(errno.ENOSPC, f"disk full while writing {os.fspath(path)}")
        self.path = os.fspath(path)

    def __str__(self) -> str:
        return self.strerror


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk (``OSError`` ENOSPC, or the iostream/IO error torch and safetensors raise) inside the block into
    :class:`DiskFull` naming ``path``, and remove ``path`` if it is a file left half-written (a truncated JSON or PNG
    must not pass for a result); other errors pass through."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _disk_full(path) from err
        raise
    except Exception as err:  # noqa: BLE001 - RuntimeError (torch), SafetensorError (safetensors): told apart by text
        if any(text in str(err) for text in _DISK_FULL_TEXTS) or (isinstance(err, RuntimeError) and _nearly_full(path)):
            raise _disk_full(path) from err
        raise


def _disk_full(path: str | os.PathLike) -> DiskFull:
    if os.path.isfile(path):
        with contextlib.suppress(OSError):
            os.remove(path)
    return DiskFull(path)


def _nearly_full(path: str | os.PathLike) -> bool:
    # torch's zip writer reports a full disk as "unexpected pos N vs M": ask the file system instead of the message
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """An output folder given as ``flag``, checked before any work: it may not exist yet, but must not be a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {os.fspath(path)!r} exists and is not a folder")
    parent = next((p for p in path.parents if p.exists()), None)  # the folder it would be made in
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{flag} {os.fspath(path)!r} is under {os.fspath(parent)!r}, which is a file")
    return path


def one_line(err: BaseException) -> str:
    """An error as one line (messages from libraries may hold newlines)."""
    return " ".join(str(err).split()) or type(err).__name__


def run_main(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's body; a user error (``ValueError``, ``OSError``, ``RuntimeError``) becomes one line on stderr
    and exit status 2. Returns the body's exit status (0 when it returns None)."""
    try:
        return int(body() or 0)
    except (ValueError, OSError, RuntimeError) as err:
        sys.stderr.write(f"{prog}: error: {one_line(err)}\n")
        return EXIT_USAGE
    except MemoryError:
        sys.stderr.write(f"{prog}: error: out of memory: use smaller images (--resolution) or batches\n")
        return EXIT_USAGE


def run_command(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None], argv) -> int:
    """Parse ``argv``, log at INFO, then ``run(args)``; a user error is one line on stderr and exit status 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_main(parser.prog, lambda: run(args))


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """``type=`` for an integer option that must be ``>= low``."""

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return check


def positive_float(text: str) -> float:
    """``type=`` for a finite float option that must be > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def check_finite(x, what: str) -> None:
    """Refuse a tensor holding NaN/Inf: they would be written as black pixels, scored as a (bad) result, or poison
    everything decoded from them."""
    bad = int((~x.isfinite()).sum())
    if bad:
        raise ValueError(f"{what} contain {bad} NaN/Inf values of {x.numel()}: expected finite numbers")
