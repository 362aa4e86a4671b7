"""All LWF state in one object, saved next to every checkpoint: tensors as safetensors, the rest as JSON.

Nothing here uses pickle: a checkpoint from an untrusted source can at worst fail to load with a clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .distributed import full_tensor, is_sharded, like_shard


STATE_JSON = "lwf_state.json"
STATE_TENSORS = "lwf_state.safetensors"
CONFIG_NAME = "lwf_config.json"
SELF_DATA_DIR = "_lwf_self_data"
FORMAT_VERSION = 2  # 2 adds `checksums`; files of version 1 (without them) still load
_READABLE_VERSIONS = (1, 2)
TENSORS_CHECKSUM = STATE_TENSORS  # the key of the tensor file's sha256 in `checksums`
WEIGHTS_CHECKSUM = "model_weights"  # the key of the sha256 of the trainable weights the state was saved with
_TENSOR_GROUPS = ("fisher", "reference")


@dataclass
class LWFState:
    """Counters, tensors and selections that make an LWF run resumable exactly."""

    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    generation_hash: str = ""
    self_data_path: str | None = None
    self_data_sizes: dict[str, int] = field(default_factory=dict)
    fisher_updates: int = 0
    fisher_factor: float = 1.0  # the online Fisher is fisher_factor * the stored ``fisher`` tensors (fp32 F)
    unlearn_points: int = 0
    unlearn_steps: int = 0
    skipped_steps: int = 0
    empty_selections: int = 0
    idle_points: int = 0
    scores: list[float] = field(default_factory=list)
    forget_indices: list[int] = field(default_factory=list)
    forget_sizes: dict[str, int] = field(default_factory=dict)
    selection_seed: int = -1  # the seed D_U was selected with (-1: unknown, a state saved before hf_lwf recorded it)
    sampler: dict[str, int] = field(default_factory=dict)
    drawn: dict[str, int] = field(default_factory=dict)  # D_self index -> ascent batches it was drawn into
    unlearned: dict[str, int] = field(default_factory=dict)  # D_self index -> applied ascent steps it counted in
    history: list[dict[str, float]] = field(default_factory=list)
    # sha256 of lwf_state.safetensors and of the model weights this state was saved with (see hf_lwf.checkpoint);
    # filled in by save(), checked by load() and on resume; empty for a state read from a format-1 file
    checksums: dict[str, str] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    reference: dict[str, torch.Tensor] = field(default_factory=dict)

    def run_summary(self) -> dict[str, int]:
        """What LWF actually did: the counts the model card and ``lwf_config.json`` report.

        ``forgotten_samples`` counts the D_self samples that entered an ascent step that moved the weights (under
        the loss cap); ``selected_samples`` is the size of the last D_U, whether or not a step drew them."""
        return {
            "unlearn_points": self.unlearn_points,
            "idle_points": self.idle_points,
            "unlearn_steps": self.unlearn_steps,
            "skipped_steps": self.skipped_steps,
            "empty_selections": self.empty_selections,
            "selected_samples": len(self.forget_indices),
            "forgotten_samples": len(self.unlearned),
            "fisher_updates": self.fisher_updates,
        }

    def place_like(self, parameters: dict[str, torch.Tensor], device: torch.device | str | None = None) -> None:
        """Move every state tensor onto ``device``, or by default the device of its parameter (after loading on CPU).

        The dtype stays as saved: it is the one a fresh run chose (fp32, or ``lwf_fisher_dtype`` for F). Next to an
        FSDP2-sharded parameter a tensor becomes a ``DTensor`` shard laid out like it (from the whole tensor, or from
        this rank's rows as :meth:`load` reads them with ``rows``).
        """
        for group in _TENSOR_GROUPS:
            tensors = getattr(self, group)
            for name, tensor in tensors.items():
                if name not in parameters:
                    continue
                param = parameters[name]
                if is_sharded(param):
                    tensors[name] = like_shard(tensor, param)
                else:
                    tensors[name] = tensor.to(device if device is not None else param.device)

    def is_sharded(self) -> bool:
        return any(is_sharded(t) for group in _TENSOR_GROUPS for t in getattr(self, group).values())

    def tensors_for_saving(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """``{"fisher/<name>": ..., "reference/<name>": ...}`` as whole CPU tensors.

        Sharded (FSDP) tensors are all-gathered one at a time, in name order: every rank must call this. Ranks that
        do not write pass ``keep=False`` and hold no gathered copy beyond the one being gathered.
        """
        out = {}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # pinned host copies of theta_ref are written without blocking
        for group in _TENSOR_GROUPS:
            tensors = getattr(self, group)
            for name in sorted(tensors):
                whole = full_tensor(tensors[name].detach())
                if keep:
                    out[f"{group}/{name}"] = whole.to("cpu").contiguous()
        return out

    def scalars(self) -> dict[str, Any]:
        """The JSON part of the state."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _TENSOR_GROUPS}
        return {"format_version": FORMAT_VERSION, **data}

    def save(self, directory: str, tensors: dict[str, torch.Tensor] | None = None, weights_sha256: str = "") -> None:
        """Write ``lwf_state.safetensors`` and ``lwf_state.json`` into ``directory``, each atomically.

        ``tensors``: what :meth:`tensors_for_saving` returned (needed when the state is sharded: the gather is
        collective, the write is not). The JSON records the sha256 of the tensor file and ``weights_sha256`` (of
        the model weights saved with it, :func:`hf_lwf.checkpoint.weights_sha256`), so that a resume can refuse
        parts that do not belong together."""
        os.makedirs(directory, exist_ok=True)
        if tensors is None:
            if self.is_sharded():
                raise ValueError("A sharded LWF state is saved with save(directory, tensors=state.tensors_for_saving()).")
            tensors = self.tensors_for_saving()
        written = _atomic_write(directory, STATE_TENSORS,
                                lambda path: save_file(tensors, path, metadata={"format": "hf_lwf"}))
        self.checksums = {TENSORS_CHECKSUM: file_sha256(written), WEIGHTS_CHECKSUM: weights_sha256}
        atomic_write_text(directory, STATE_JSON, json.dumps(self.scalars(), indent=2, sort_keys=True, allow_nan=False))

    @classmethod
    def load(cls, directory: str, device: torch.device | str = "cpu", rows: dict[str, slice] | None = None) -> LWFState:
        """Read the state saved in ``directory``; anything malformed or foreign raises a ``ValueError``, and so does a
        tensor file other than the one ``lwf_state.json`` was saved with (format 2).

        ``rows``: for the named parameters, read only these rows (dim 0) of their tensors: an FSDP rank reads its
        own shard, never the whole tensor."""
        tensor_path = os.path.join(directory, STATE_TENSORS)
        if not os.path.isfile(os.path.join(directory, STATE_JSON)) or not os.path.isfile(tensor_path):
            missing = STATE_JSON if not os.path.isfile(os.path.join(directory, STATE_JSON)) else STATE_TENSORS
            raise FileNotFoundError(f"No LWF state file {os.path.join(directory, missing)}.")
        state = cls.read_scalars(directory)
        recorded = state.checksums.get(TENSORS_CHECKSUM)
        if recorded and file_sha256(tensor_path) != recorded:
            raise ValueError(
                f"{tensor_path} is not the tensor file {os.path.join(directory, STATE_JSON)} was saved with (its sha256 "
                "differs from the one recorded there): the two files of this LWF state do not belong together."
            )
        try:
            with safe_open(tensor_path, framework="pt", device=str(device)) as handle:
                if (handle.metadata() or {}).get("format") != "hf_lwf":
                    raise ValueError("missing the hf_lwf format marker")
                for key in handle.keys():
                    group, _, name = key.partition("/")
                    if group not in _TENSOR_GROUPS or not name:
                        raise ValueError(f"unexpected tensor {key!r}")
                    if rows is not None and rows.get(name) is not None:
                        getattr(state, group)[name] = handle.get_slice(key)[rows[name]]
                    else:
                        getattr(state, group)[name] = handle.get_tensor(key)
        except ValueError as err:
            raise ValueError(f"{tensor_path} is not a valid hf_lwf state file: {err}") from None
        except Exception as err:  # safetensors raises its own error types for corrupted headers
            raise ValueError(f"{tensor_path} is not a valid hf_lwf state file: {err}") from None
        return state

    @classmethod
    def read_scalars(cls, directory: str) -> LWFState:
        """The JSON part of the state saved in ``directory`` (no tensors); anything malformed raises a ValueError."""
        json_path = os.path.join(directory, STATE_JSON)
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"No LWF state file {json_path}.")
        try:
            with open(json_path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{json_path} is not a valid hf_lwf state file: {err}") from None
        version = data.pop("format_version", None) if isinstance(data, dict) else None
        if version not in _READABLE_VERSIONS or isinstance(version, bool):
            raise ValueError(f"{json_path} is not an hf_lwf state file of format version "
                             f"{' or '.join(map(str, _READABLE_VERSIONS))}.")
        if version >= 2 and not _valid_checksums(data.get("checksums")):
            raise ValueError(f"{json_path} (format version {version}) lacks the checksums of its tensor file and model "
                             "weights: not a complete hf_lwf state file.")
        data.pop("failed_points", None)  # hf_lwf 0.1.0 counted swallowed failures; a failure now stops the run
        known = {f.name: f for f in dataclasses.fields(cls) if f.name not in _TENSOR_GROUPS}
        unknown = set(data) - set(known)
        if unknown:
            raise ValueError(f"{json_path} has unknown fields {sorted(unknown)}: not an hf_lwf state file.")
        for name, value in data.items():
            if not _type_matches(value, getattr(cls(), name)) or not _elements_match(name, value):
                raise ValueError(f"{json_path}: field {name!r} has the wrong type ({type(value).__name__}).")
        return cls(**data)


def write_config(directory: str, config: dict[str, Any], run: dict[str, int] | None = None) -> str:
    """Write ``lwf_config.json`` into ``directory`` atomically; returns its path.

    It holds the ``lwf_*`` values and, under ``lwf_run``, what LWF actually did (:meth:`LWFState.run_summary`).
    """
    data = {**config, "lwf_run": run} if run is not None else config
    return atomic_write_text(directory, CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True))


def atomic_write_text(directory: str, name: str, text: str) -> str:
    """Write ``text`` to ``directory/name`` so that readers never see half a file."""
    return _atomic_write(directory, name, lambda path: _write_text(path, text))


# Element types of the container fields: JSON ints are valid floats, bools are neither.
_ELEMENT_TYPES = {"self_data_sizes": int, "forget_sizes": int, "sampler": int, "forget_indices": int, "scores": float,
                  "drawn": int, "unlearned": int, "checksums": str}


def _elements_match(name: str, value: Any) -> bool:
    kind = _ELEMENT_TYPES.get(name)
    if kind is None:
        return True
    allowed = (int, float) if kind is float else (kind,)
    items = value.values() if isinstance(value, dict) else value
    return all(isinstance(v, allowed) and not isinstance(v, bool) for v in items)


def _type_matches(value: Any, default: Any) -> bool:
    if default is None:
        return value is None or isinstance(value, str)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def _valid_checksums(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get(TENSORS_CHECKSUM), str)
            and len(value[TENSORS_CHECKSUM]) == 64 and isinstance(value.get(WEIGHTS_CHECKSUM), str))


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _atomic_write(directory: str, name: str, write) -> str:
    """Write through a temporary file in ``directory`` and rename it, so readers never see half a file."""
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    os.close(descriptor)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        target = os.path.join(directory, name)
        os.replace(temporary, target)
        return target
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
