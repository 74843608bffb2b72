"""Checkpoints of a training run: ``output_dir/checkpoint-<step>/`` on Accelerate's own state machinery, written
atomically and together by every process, found, checked, retired, and the one-run-per-folder lock.

``checkpoint_state.py`` registers what a checkpoint carries beyond Accelerate's state; docs/training.md has the layout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from .checkpoint_state import DISC_FOLDER, REGISTERED_STATES, VAE_FOLDER, registered_state_file

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "training_state.json"  # written last: a checkpoint folder without it is incomplete
TRAINING_ARGS = "training_args.json"  # a run's arguments, written once it is set up (klvae-push --training-args reads it)
LOCK_NAME = ".train.lock"


# -------------------------------------------------------------------------------------------------- save, load


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, *, training_state: dict | None = None,
                    total_limit: int | None = None) -> Path:
    """Write ``output_dir/checkpoint-<step>/`` atomically (``accelerator.save_state`` into a temporary folder, the
    marker last, one rename) and return its path. Every process must call it.

    ``output_dir`` must be visible to every process (a shared filesystem on multi-node runs). A full disk on any
    process raises :class:`diffusers_klvae.cli_support.DiskFull` naming the checkpoint on every process (none is
    left waiting for one that failed); the temporary folder is removed and the previous checkpoints are untouched.

    Args:
        accelerator: the ``Accelerator``, with :func:`~diffusers_klvae.checkpoint_state.register_checkpoint_state` done.
        output_dir (`str`): the run's folder.
        step (`int`): optimizer updates done.
        training_state (`dict`, *optional*): JSON-serialisable extras for ``training_state.json`` (loss history, ...).
        total_limit (`int`, *optional*): keep at most this many complete checkpoints (oldest removed).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    main = accelerator.is_main_process

    def start() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def finish() -> None:
        state = {"step": step, "num_processes": accelerator.num_processes, **(training_state or {})}
        (tmp / CHECKPOINT_MARKER).write_text(json.dumps(state))
        if final.exists():  # re-saving a step (e.g. after resuming from it): replace
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic on POSIX: `latest` never sees a half-written checkpoint-<step>
        prune_checkpoints(output_dir, total_limit)

    cleanup = partial(shutil.rmtree, tmp, ignore_errors=True)  # give the space back; the previous checkpoints stay
    write_together(accelerator, final, start if main else None, cleanup=cleanup)
    # every process: its RNG states; the main process: the rest (the marker only once every process's files are in)
    write_together(accelerator, final, partial(accelerator.save_state, os.fspath(tmp)), cleanup=cleanup)
    write_together(accelerator, final, finish if main else None, cleanup=cleanup)
    if main:
        logger.info("saved %s", final)
    return final


def write_together(accelerator, path: Path, write, *, cleanup=None):
    """Run ``write`` (None: nothing) on this process, then learn from every process whether its part failed, in one
    collective that all of them reach, failed or not; then all return (``write``'s result), or all raise, the main
    process after ``cleanup``. A full disk is :class:`~diffusers_klvae.cli_support.DiskFull` naming ``path`` on every process, so each
    ends with the same one-line error instead of waiting at a barrier for a process that has already failed."""
    from accelerate.utils import gather_object

    from .cli_support import DiskFull, one_line, writing

    error = result = None
    try:
        with writing(path):
            if write is not None:
                result = write()
    except Exception as err:  # noqa: BLE001 - re-raised below, once the other processes know
        error = err
    mine = None if error is None else (accelerator.process_index, isinstance(error, DiskFull), one_line(error))
    failures = [f for f in gather_object([mine]) if f is not None]
    if not failures:
        return result
    if accelerator.is_main_process and cleanup is not None:
        cleanup()
    accelerator.wait_for_everyone()  # all end together, after the cleanup (torchrun stops the rest once one exits)
    if error is not None:
        raise error
    rank, disk_full, message = failures[0]
    raise DiskFull(path) if disk_full else RuntimeError(f"process {rank} failed while writing {path}: {message}")


def load_checkpoint(accelerator, path: str | os.PathLike, *, use_ema: bool) -> dict:
    """Restore everything :func:`save_checkpoint` wrote (``accelerator.load_state``; call after ``prepare`` and
    :func:`~diffusers_klvae.checkpoint_state.register_checkpoint_state`); returns its ``training_state.json`` (``step`` etc.)."""
    from .loading import EMA_WEIGHTS_NAME

    path = Path(path)
    state = json.loads((path / CHECKPOINT_MARKER).read_text())
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{path} was written by {state['num_processes']} processes; this run has "
                         f"{accelerator.num_processes}: exact resume needs the same number")
    if use_ema and not (path / VAE_FOLDER / EMA_WEIGHTS_NAME).is_file():
        raise ValueError(f"--use_ema but {path} was saved without EMA: resume without --use_ema, or start a new run")
    try:
        accelerator.load_state(os.fspath(path))
    except ValueError as err:  # torch's optimizer check names neither the checkpoint nor the flag behind it
        if "parameter group" not in str(err):
            raise
        raise ValueError(f"the optimizer state in {path} does not fit this run's trainable parameters: was it saved "
                         "with another --decoder_only or --learn_logvar? Pass the same to continue that run") from err
    logger.info("resumed from %s (step %d)", path, state["step"])
    return state


# --------------------------------------------------------------------- finding, checking, retiring checkpoints


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """``.../checkpoint-1200`` -> 1200; anything else -> None."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint is complete when its marker (written last, before the atomic rename) is there."""
    return checkpoint_step(path) is not None and (Path(path) / CHECKPOINT_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary and incomplete folders are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_complete_checkpoint(p)), key=checkpoint_step)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why a marked checkpoint cannot be resumed (a file missing, an unreadable marker), or None if it can."""
    from accelerate.utils import OPTIMIZER_NAME, RNG_STATE_NAME, SCHEDULER_NAME

    from .loading import WEIGHTS_NAME

    path = Path(path)
    try:
        state = json.loads((path / CHECKPOINT_MARKER).read_text())
        world, step = int(state["num_processes"]), state.get("step")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {CHECKPOINT_MARKER} ({type(err).__name__}: {err})"
    if type(step) is not int or step != checkpoint_step(path):  # the loop continues from it; the folder name orders it
        given = "no step" if step is None else f"step {step!r}"
        return f"{CHECKPOINT_MARKER} has {given}, expected {checkpoint_step(path)} (the folder's number)"
    needed = [f"{VAE_FOLDER}/{WEIGHTS_NAME}", f"{DISC_FOLDER}/{WEIGHTS_NAME}",
              *(f"{name}{suffix}.bin" for name in (OPTIMIZER_NAME, SCHEDULER_NAME) for suffix in ("", "_1")),
              *(registered_state_file(".", name).name for name in REGISTERED_STATES),
              *(f"{RNG_STATE_NAME}_{rank}.pkl" for rank in range(world))]
    missing = [name for name in needed if not (path / name).is_file()]
    return f"missing {', '.join(missing)}" if missing else None


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder that has all its files, or None; newer broken ones are
    skipped with a warning naming what they lack."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping %s: %s", path, problem)
    return None


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``--resume_from_checkpoint``: None -> None; "latest" -> newest usable one (None if none yet); else the folder."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            broken = list_checkpoints(output_dir)
            if broken:  # checkpoints, none usable: starting over would be refused as "an earlier run"
                raise ValueError(f"no usable checkpoint in {output_dir}: "
                                 + "; ".join(f"{p.name}: {checkpoint_problem(p)}" for p in broken))
            logger.info("no complete checkpoint in %s yet: starting a new run", output_dir)
        return latest
    path = Path(resume_from_checkpoint)
    if not is_complete_checkpoint(path):
        raise ValueError(f"{path} is not a complete checkpoint-<step> folder (no {CHECKPOINT_MARKER})")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"cannot resume from {path}: {problem}")
    return path


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Remove temporary folders of killed saves, then all but the newest ``keep`` complete checkpoints.

    Not ``ProjectConfiguration(total_limit=...)``: Accelerate's pruning needs its automatic naming
    (``checkpoints/checkpoint_<save count>``, not the step), counts every folder there (incomplete or abandoned ones
    too) and deletes *before* the new checkpoint is written, so a kill mid-save would leave fewer good ones.
    """
    for stale in output_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep is None:
        return
    found = list_checkpoints(output_dir)
    for old in found[: max(0, len(found) - keep)]:
        logger.info("removing old checkpoint %s (--checkpoints_total_limit %d)", old, keep)
        shutil.rmtree(old, ignore_errors=True)


class OutputDirError(ValueError):
    """The output folder cannot take this run (another run holds it, or it holds an earlier run's results)."""


def check_no_earlier_run(output_dir: str | os.PathLike, *, resume: Path | None = None) -> None:
    """A new run (or ``resume``, a checkpoint of another folder, continued here) must not overwrite or mix with an
    earlier run's checkpoints, model or validation and log files, nor with files that are not a run's. A folder
    where a run started (``TRAINING_ARGS``) and wrote nothing else yet may start again."""
    output_dir = Path(output_dir)
    found = [p.name for p in list_checkpoints(output_dir)] + [n for n in ("config.json",) if (output_dir / n).is_file()]
    if found:
        advice = (": continue it with --resume_from_checkpoint latest, or choose another --output_dir" if resume is None
                  else f", which resuming {resume} there would replace: choose another --output_dir")
        raise OutputDirError(f"--output_dir {output_dir} holds an earlier run ({', '.join(found)}){advice}")
    # a killed run's left-overs (a stale temporary checkpoint is removed at the first save)
    others = sorted(p.name for p in output_dir.iterdir()
                    if p.name not in (LOCK_NAME, TRAINING_ARGS) and not p.name.startswith(f".tmp-{CHECKPOINT_PREFIX}"))
    listed = f"{', '.join(others[:5])}{', ...' if len(others) > 5 else ''}"
    if others and (output_dir / TRAINING_ARGS).is_file():  # validation/, logs/...: a new run would append to them
        raise OutputDirError(f"--output_dir {output_dir} holds the outputs of an earlier run that saved no checkpoint "
                             f"({listed}): nothing to resume; move them away or choose another --output_dir")
    if others:
        raise OutputDirError(f"--output_dir {output_dir} is not empty and no training run started there (it holds "
                             f"{listed}): choose an empty or new folder")


def check_resume_step(resume: Path, max_train_steps: int) -> None:
    """A checkpoint past the end has nothing left to train (the final step's checkpoint may redo the final save)."""
    if checkpoint_step(resume) > max_train_steps:
        raise ValueError(f"{resume.name} is past --max_train_steps {max_train_steps}: raise --max_train_steps to continue "
                         "that run")


def set_aside_abandoned(output_dir: str | os.PathLike, resume: Path) -> Path | None:
    """Resuming from an older checkpoint abandons what the run did after it: the newer checkpoints and the validation
    outputs of later steps (grids, ``metrics.jsonl`` lines) move to ``abandoned-<time>/`` (not deleted), so a later
    ``latest`` continues this run, not the abandoned one, and ``metrics.jsonl`` holds one line per step of the run
    that goes on. Call once the checkpoint is loaded (nothing moves for a resume that fails). Returns the folder."""
    from .train_outputs import set_aside_validation

    step = checkpoint_step(resume)
    newer = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) > step]
    aside = Path(output_dir) / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    for path in newer:
        aside.mkdir(exist_ok=True)
        shutil.move(os.fspath(path), os.fspath(aside / path.name))
    steps = set_aside_validation(output_dir, step, aside)
    if not (newer or steps):
        return None
    moved = [p.name for p in newer]
    if steps:
        moved.append(f"validation outputs of step {steps[0]}" if len(steps) == 1 else
                     f"validation outputs of steps {steps[0]}..{steps[-1]}")
    logger.warning("resuming from %s: moved the newer %s aside to %s", resume.name, " and ".join(moved), aside)
    return aside


@contextmanager
def output_dir_lock(output_dir: str | os.PathLike):
    """An exclusive lock on ``output_dir`` for the run's life; a second run refuses with the holder's pid.

    ``fcntl.flock`` (POSIX) is released by the kernel when the process dies, so a killed run leaves no stale lock.
    """
    import fcntl

    path = Path(output_dir) / LOCK_NAME
    with open(path, "a+") as file:  # closing releases the flock
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            raise OutputDirError(f"--output_dir {path.parent} is in use by another training run (pid {holder}): "
                                 "wait for it to end or choose another --output_dir") from None
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        yield
