"""SIGKILL this process at a chosen moment of a checkpoint write (tests/test_preemption.py and its torchrun scripts).

Every writer a checkpoint goes through is wrapped: the model's safetensors (``transformers.modeling_utils``),
``torch.save`` (optimizer, scheduler, RNG, DeepSpeed's engine files), ``TrainerState.save_to_json``, hf_lwf's
atomic writes (LWF state, ``lwf_config.json``, ``training_args.json``) and its completion marker, the D_self copy
(``Dataset.save_to_disk``), accelerate's FSDP model and optimizer saves, and ``shutil.rmtree`` of a checkpoint
(rotation). Each call is an event named after the file it writes (a temporary file of an atomic write by its
final name), counted per name in this process.

A moment is ``<name>:<n>:<phase>``: the n-th event of that name, ``before`` (nothing of it written), ``mid`` (half of
its bytes written; for a rotation, half of the folder's files deleted) or ``after`` (written, nothing later). Or
``random:<seed>:<p>``: each event is the moment with probability ``p``, the phase drawn too (a seeded stream: the
same run gets the same kill). Each event is logged to ``log`` as ``<name> <n> <phase-or-ok>`` before it runs, so a
test can tell where the kill landed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import shutil
import signal
import sys
from contextlib import contextmanager


PHASES = ("before", "mid", "after")
_TEMPORARY = re.compile(r"^\.(.+)\.[^.]+$")  # ".lwf_state.json.k2j3h4": an atomic write of lwf_state.json


class _Killer:
    def __init__(self, moment: str | None, log: str | None):
        self.counts: dict[str, int] = {}
        self.log = log
        self.random = None
        self.target = None
        if moment and moment.startswith("random:"):
            _, seed, probability = moment.split(":")
            self.random, self.probability = random.Random(int(seed)), float(probability)
        elif moment:
            name, n, phase = moment.rsplit(":", 2)
            if phase not in PHASES:
                raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
            self.target = (name, int(n), phase)

    def phase(self, name: str) -> tuple[str | None, int]:
        """Which phase of this event kills the process (None: it runs through)."""
        n = self.counts[name] = self.counts.get(name, 0) + 1
        chosen = None
        if self.random is not None:
            if self.random.random() < self.probability:
                chosen = self.random.choice(PHASES)
        elif self.target is not None and self.target[:2] == (name, n):
            chosen = self.target[2]
        self._note(f"{name} {n} {chosen or 'ok'}")
        return chosen, n

    def _note(self, line: str) -> None:
        if self.log:
            with open(self.log, "a", encoding="utf-8") as handle:
                handle.write(f"{os.environ.get('RANK', '0')} {line}\n")

    def kill(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def event_name(path) -> str:
    base = os.path.basename(os.path.normpath(os.fspath(path)))
    match = _TEMPORARY.match(base)
    return match.group(1) if match else base


def _write_half(path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())


def _wrap(killer: _Killer, real, name_of, half=None):
    """Wrap ``real``: ``name_of(args, kwargs)`` names its event (``None``: not a checkpoint write, run it as is);
    ``half(args, kwargs)`` does half of its work for a ``mid`` kill (without it, ``mid`` kills before it)."""
    def wrapped(*args, **kwargs):
        name = name_of(args, kwargs)
        if name is None:
            return real(*args, **kwargs)
        phase, _ = killer.phase(name)
        if phase == "mid" and half is not None:
            half(args, kwargs)
        if phase in ("before", "mid"):
            killer.kill()
        out = real(*args, **kwargs)
        if phase == "after":
            killer.kill()
        return out

    return wrapped


def _file_writer(killer: _Killer, real, path_of, serialize):
    """Wrap ``real``, which writes the file ``path_of(args, kwargs)``; ``serialize`` gives its bytes (for ``mid``)."""
    def name_of(args, kwargs):
        path = path_of(args, kwargs)
        return event_name(path) if isinstance(path, (str, os.PathLike)) else None

    return _wrap(killer, real, name_of, lambda a, k: _write_half(path_of(a, k), serialize(a, k)))


@contextmanager
def installed(moment: str | None = None, log: str | None = None):
    """:func:`install`, undone on exit (a run in the test process itself counts its writes this way)."""
    undo = install(moment, log)
    try:
        yield
    finally:
        undo()


def install(moment: str | None = None, log: str | None = None):
    """Wrap the writers (see the module docstring); with no moment they only log and count. Returns an undo."""
    import safetensors.torch
    import torch
    import transformers.modeling_utils as modeling_utils
    import transformers.trainer as trainer_module
    from datasets import Dataset
    from transformers.trainer_callback import TrainerState

    import hf_lwf.checkpoint as checkpoint_module
    import hf_lwf.state as state_module

    killer = _Killer(moment, log)
    saved = [(module, name, getattr(module, name)) for module, name in (
        (modeling_utils, "safe_save_file"), (state_module, "save_file"), (torch, "save"), (TrainerState, "save_to_json"),
        (state_module, "_write_text"), (checkpoint_module, "_durable_write"), (shutil, "rmtree"),
        (Dataset, "save_to_disk"), (trainer_module, "save_fsdp_model"), (trainer_module, "save_fsdp_optimizer"),
    ) if hasattr(module, name)]

    def tensors_bytes(args, kwargs):
        return safetensors.torch.save(args[0], metadata=kwargs.get("metadata", args[2] if len(args) > 2 else None))

    def pickled_bytes(args, kwargs):
        buffer = io.BytesIO()
        real_torch_save(args[0], buffer)
        return buffer.getvalue()

    def trainer_state_bytes(args, kwargs):
        return (json.dumps(dataclasses.asdict(args[0]), indent=2, sort_keys=True) + "\n").encode()

    real_torch_save = torch.save
    modeling_utils.safe_save_file = _file_writer(killer, modeling_utils.safe_save_file,
                                                 lambda a, k: k.get("filename", a[1]), tensors_bytes)
    state_module.save_file = _file_writer(killer, state_module.save_file, lambda a, k: a[1], tensors_bytes)
    torch.save = _file_writer(killer, torch.save, lambda a, k: k.get("f", a[1] if len(a) > 1 else None), pickled_bytes)
    TrainerState.save_to_json = _file_writer(killer, TrainerState.save_to_json, lambda a, k: a[1],
                                             trainer_state_bytes)
    state_module._write_text = _file_writer(killer, state_module._write_text, lambda a, k: a[0],
                                            lambda a, k: a[1].encode())

    def half_marker(args, kwargs):  # the marker is written through a temporary file: half of it there
        directory, name, text = args
        _write_half(os.path.join(directory, f".{name}.partial"), text.encode())

    checkpoint_module._durable_write = _wrap(killer, checkpoint_module._durable_write, lambda a, k: a[1], half_marker)

    def rotated(args, kwargs):  # shutil.rmtree of a checkpoint folder: the rotation
        base = os.path.basename(os.path.normpath(os.fspath(args[0])))
        return "rotate" if re.search(r"checkpoint-\d+$", base) else None

    def half_deleted(args, kwargs):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(args[0]) for f in names)
        for file in files[: len(files) // 2]:
            os.remove(file)

    shutil.rmtree = _wrap(killer, shutil.rmtree, rotated, half_deleted)
    Dataset.save_to_disk = _wrap(killer, Dataset.save_to_disk, lambda a, k: "_lwf_self_data")
    for name in ("save_fsdp_model", "save_fsdp_optimizer"):  # whole steps: `mid` kills before them
        if hasattr(trainer_module, name):
            setattr(trainer_module, name, _wrap(killer, getattr(trainer_module, name), lambda a, k, n=name: n))

    def undo():
        for module, name, original in saved:
            setattr(module, name, original)

    return undo
