"""What a checkpoint carries beyond Accelerate's own state (optimizers, schedulers, grad scaler, RNG states): the
registered per-process data positions and generators, the EMA's counters, the loss's own parameters, and the hooks
that write the models as ``save_pretrained`` folders (layout in docs/training.md). ``checkpoints.py`` writes, finds
and retires the checkpoint folders.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch

VAE_FOLDER, DISC_FOLDER = "vae", "discriminator"
# what register_checkpoint_state registers, in order: Accelerate writes them as custom_checkpoint_<index>.pkl
REGISTERED_STATES = ("data_stream", "generator", "ema_counters", "loss_parameters")


def registered_state_file(checkpoint: str | os.PathLike, name: str) -> Path:
    """The file Accelerate wrote for one of :data:`REGISTERED_STATES`."""
    return Path(checkpoint) / f"custom_checkpoint_{REGISTERED_STATES.index(name)}.pkl"


class GeneratorState:
    """A ``torch.Generator`` with the ``state_dict``/``load_state_dict`` ``register_for_checkpointing`` asks for."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


class PerProcessState:
    """Per-process state (a data-stream position, a generator) as one registered object.

    Accelerate writes registered states from the main process only (one ``custom_checkpoint_<i>.pkl``), so every
    process's state is gathered (a collective) and each process loads its own entry back. The save hook gathers
    (:meth:`gather`) before ``save_state`` writes anything: a collective after a write that failed on one process
    would leave the others waiting in it.
    """

    def __init__(self, obj, *, process_index: int, num_processes: int):
        self.obj, self.process_index, self.num_processes = obj, process_index, num_processes
        self.gathered = None

    def gather(self) -> None:
        """Collect every process's state now (all processes call it: a collective); ``state_dict`` returns it."""
        from accelerate.utils import gather_object

        self.gathered = {"processes": gather_object([self.obj.state_dict()])}

    def state_dict(self) -> dict:
        if self.gathered is None:
            self.gather()
        state, self.gathered = self.gathered, None
        return state

    def load_state_dict(self, state: dict) -> None:
        processes = state["processes"]
        if len(processes) != self.num_processes:
            raise ValueError(f"checkpoint written by {len(processes)} processes; this run has {self.num_processes}")
        self.obj.load_state_dict(processes[self.process_index])


class EMACounters:
    """The EMA's counters (step, decay, ...); its weights are the ``ema`` variant in ``vae/`` (the one EMA layout,
    written and read by the model hooks), so they are not stored a second time here. Registered even without EMA:
    Accelerate refuses a checkpoint whose number of registered objects differs, and a run may resume without it."""

    def __init__(self, ema):
        self.ema = ema

    def state_dict(self) -> dict:
        return {} if self.ema is None else {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}

    def load_state_dict(self, state: dict) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(state)  # no "shadow_params": the load hook has set them


class LossParameters:
    """The loss's own trainable parameters (``--learn_logvar``); registered, empty, without them (as ``EMACounters``)."""

    def __init__(self, loss_fn):
        self.params = loss_fn.trainable_parameters() if loss_fn is not None else []

    def state_dict(self) -> dict:
        return {"params": [p.detach().cpu() for p in self.params]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["params"]) != len(self.params):
            raise ValueError(f"checkpoint holds {len(state['params'])} loss parameters (--learn_logvar), this run "
                             f"{len(self.params)}: resume with the same --learn_logvar")
        with torch.no_grad():
            for p, value in zip(self.params, state["params"]):
                p.copy_(value)


def register_checkpoint_state(accelerator, *, ema, generator: torch.Generator, data_stream, loss_fn=None) -> None:
    """Register with ``accelerator`` what ``checkpoints.save_checkpoint`` / ``load_checkpoint`` must carry beyond
    Accelerate's own: the stream position and the generator (per process), the EMA, the loss's own parameters
    (``--learn_logvar``), and the models as ``save_pretrained`` folders. Call once, after ``accelerator.prepare``
    (the VAE first, the discriminator second)."""
    per_process = dict(process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    states = {"data_stream": PerProcessState(data_stream, **per_process),
              "generator": PerProcessState(GeneratorState(generator), **per_process),
              "ema_counters": EMACounters(ema), "loss_parameters": LossParameters(loss_fn)}
    accelerator.register_for_checkpointing(*(states[name] for name in REGISTERED_STATES))
    gathered = [states["data_stream"], states["generator"]]
    accelerator.register_save_state_pre_hook(partial(_save_models, accelerator, ema, gathered))
    accelerator.register_load_state_pre_hook(partial(_load_models, accelerator, ema))


def _save_models(accelerator, ema, per_process: list[PerProcessState], models: list, weights: list, output_dir: str) -> None:
    """Accelerate's save hook (every process, before ``save_state`` writes anything): the collectives first (gather
    the per-process states), then the VAE (raw + ``ema`` variant) and the discriminator as ``save_pretrained``
    folders instead of Accelerate's ``model*.safetensors`` (emptying ``weights`` tells it not to write those)."""
    from .loading import save_model_folder

    for state in per_process:
        state.gather()
    vae, disc = models
    if accelerator.is_main_process:
        save_model_folder(accelerator.unwrap_model(vae), Path(output_dir) / VAE_FOLDER, ema=ema)
        accelerator.unwrap_model(disc).save_pretrained(Path(output_dir) / DISC_FOLDER)
    weights.clear()


def _load_models(accelerator, ema, models: list, input_dir: str) -> None:
    """Accelerate's load hook: the weights :func:`_save_models` wrote (emptying ``models`` tells Accelerate not to
    look for its own files); also the pickle check that must run before Accelerate reads its files."""
    from .loading import EMA_WEIGHTS_NAME, WEIGHTS_NAME

    _refuse_unsafe_pickles(Path(input_dir))
    vae, disc = (accelerator.unwrap_model(m) for m in models)
    _load_weights(vae, Path(input_dir) / VAE_FOLDER / WEIGHTS_NAME)
    _load_weights(disc, Path(input_dir) / DISC_FOLDER / WEIGHTS_NAME)
    if ema is not None:
        shadow = _read_weights(Path(input_dir) / VAE_FOLDER / EMA_WEIGHTS_NAME)
        ema.shadow_params = [shadow[name].to(p.device, p.dtype) for name, p in vae.named_parameters()]
    models.clear()


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path} is corrupt or truncated ({err})") from None


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    """A checkpoint's weights into ``module``; weights of another architecture are named in one line, not as
    ``load_state_dict``'s list of every mismatched tensor."""
    state, own = _read_weights(path), module.state_dict()
    differ = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
    if differ:
        raise ValueError(f"{path} does not fit the model of this run ({len(differ)} tensors differ, e.g. {differ[0]!r}): "
                         "resume with the model arguments of the run that saved it")
    module.load_state_dict(state, strict=True)


def _refuse_unsafe_pickles(folder: Path) -> None:
    """Read every pickle of the checkpoint with ``torch.load(weights_only=True)`` first: Accelerate (1.x) reads its
    own files that way, but registered objects (``custom_checkpoint_<i>.pkl``) with ``weights_only=False``. Ours
    hold only tensors, numbers, strings, lists and dicts; a file with anything else fails here, before that
    unrestricted load."""
    for file in sorted(folder.glob("custom_checkpoint_*.pkl")):
        try:
            torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - UnpicklingError and friends: refuse the file, say which
            # torch cannot tell a broken file from a forbidden object ("Unsupported operand" either way): say both
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            cause = next((b for a, b in zip(lines, lines[1:]) if a.endswith("WeightsUnpickler error:")), lines[0] if lines else "")
            raise ValueError(f"{file} is corrupt or holds more than tensors and plain values; refusing to unpickle it "
                             f"({cause})") from None
