"""Checkpoints that are complete or ignored, so that a run can be killed at any moment and resumed exactly.

A checkpoint folder is complete when it holds ``checkpoint_complete.json``, the completion marker. It is written
last: after every rank has finished writing its part (a barrier), by the process(es) that write checkpoints, and it
lists every file of the folder with its size and sha256 (each file is flushed to disk first). Resuming takes the
newest folder whose files still match their marker. Newer folders that do not (a save that was killed, a disk that
filled up) are moved into ``<output_dir>/_incomplete_checkpoints/`` and logged, never deleted; the leading ``_``
keeps them out of ``push_to_hub`` uploads and the folder name keeps them out of the Trainer's checkpoint search and
rotation.

A folder without a marker in an output folder where no checkpoint has one was written by a plain ``Trainer`` or an
hf_lwf that wrote no markers: it is accepted when its ``trainer_state.json`` (which the Trainer writes after the
model, optimizer and RNG states) parses and names the folder's step, its weights are there and, for an LWF
checkpoint, its LWF state files are there (a warning says that nothing more could be checked). Where any checkpoint
has a marker, a folder without one is an interrupted save.

The parts of a checkpoint belong together: ``lwf_state.json`` records the sha256 of its tensor file and of the
trainable weights it was saved with (:func:`weights_sha256`); :func:`check_weights` refuses an LWF state whose model
is not the one loaded for the resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .distributed import gather_objects, is_distributed
from .state import CONFIG_NAME, STATE_JSON, STATE_TENSORS, WEIGHTS_CHECKSUM, LWFState, file_sha256


logger = logging.get_logger(__name__)

MARKER_NAME = "checkpoint_complete.json"
SET_ASIDE_DIR = "_incomplete_checkpoints"
SET_ASIDE_NOTE = "SET_ASIDE_BY_HF_LWF.txt"
MARKER_FORMAT = "hf_lwf checkpoint"
MARKER_VERSION = 1
TRAINER_STATE = "trainer_state.json"
# What holds a checkpoint's model in each of the Trainer's formats (plain, sharded, PEFT, FSDP, DeepSpeed).
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                 "adapter_model.safetensors", "adapter_model.bin", "latest")
_WEIGHT_DIR_PREFIX = "pytorch_model_fsdp_"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_ROTATED = "_rotated-"  # a checkpoint being deleted by rotation


class IncompleteCheckpointError(ValueError):
    """A checkpoint named for resuming is incomplete, damaged, or has parts that do not belong together."""


# ------------------------------------------------------------------------------------------- the marker
def write_marker(folder: str, step: int) -> str:
    """Flush every file of ``folder`` to disk and write the completion marker listing their sizes and sha256."""
    files = _files(folder)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        hashed = list(pool.map(lambda rel: _hash_and_flush(os.path.join(folder, rel)), files))
    entries = {rel: {"size": size, "sha256": digest} for rel, (size, digest) in zip(files, hashed)}
    data = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "step": step, "files": entries}
    return _durable_write(folder, MARKER_NAME, json.dumps(data, indent=1, sort_keys=True))


def incomplete_reason(folder: str, legacy: bool = False, verify: bool = True) -> str | None:
    """Why ``folder`` cannot be resumed from, or ``None`` when it is a complete checkpoint.

    ``legacy``: no checkpoint of this output folder has a marker, so one without a marker is checked as a plain
    Trainer checkpoint (module docstring). ``verify``: compare every file's sha256, not only its size."""
    if not os.path.isdir(folder):
        return "it is not a folder"
    marker = os.path.join(folder, MARKER_NAME)
    if os.path.isfile(marker):
        return _marker_mismatch(folder, verify)
    if not legacy:
        return f"it has no {MARKER_NAME}: its save was interrupted before every part was written"
    return _plain_checkpoint_problem(folder)


def checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder in ``output_dir``, newest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return sorted(found, reverse=True)


def last_complete_checkpoint(output_dir: str | os.PathLike, set_aside: bool = True, verify: bool = True) -> str | None:
    """The newest complete checkpoint folder in ``output_dir`` (``None`` when there is none), for
    ``trainer.train(resume_from_checkpoint=last_complete_checkpoint(output_dir))``.

    Newer folders that are incomplete are logged and, with ``set_aside``, moved into
    ``output_dir/_incomplete_checkpoints/`` (never deleted), so that the Trainer neither resumes from them nor
    counts them when it rotates checkpoints. Call it where the training job starts, not while another process
    writes checkpoints into ``output_dir``. ``verify``: check every file's sha256 (reads the whole checkpoint), not
    only that the marker's files exist with their sizes.
    """
    return _scan(os.fspath(output_dir), set_aside, verify, log=True)[0]


def set_aside_folder(folder: str, reason: str) -> str | None:
    """Move ``folder`` into ``_incomplete_checkpoints/`` next to it and say why; its new path, or ``None`` when it
    is gone (another process moved it) or cannot be moved (then it is reported and left in place)."""
    parent = os.path.join(os.path.dirname(os.path.abspath(folder)), SET_ASIDE_DIR)
    name = os.path.basename(os.path.normpath(folder))
    try:
        os.makedirs(parent, exist_ok=True)
        target, n = os.path.join(parent, name), 1
        while os.path.exists(target):
            target, n = os.path.join(parent, f"{name}.{n}"), n + 1
        os.rename(folder, target)
    except OSError as err:
        if os.path.exists(folder):
            logger.warning(f"{folder} is not a complete checkpoint ({reason}) and could not be moved aside ({err}): "
                           "it is left in place and will not be resumed from.")
        return None
    with contextlib.suppress(OSError):
        with open(os.path.join(target, SET_ASIDE_NOTE), "w", encoding="utf-8") as handle:
            handle.write(f"{folder}\nmoved here by hf_lwf at {time.strftime('%Y-%m-%d %H:%M:%S')}: {reason}.\n")
    logger.warning(f"{folder} is not a complete checkpoint ({reason}): moved to {target}. Nothing was deleted; "
                   "delete it once you have no use for it.")
    return target


# ------------------------------------------------------------------------------------- resuming
def resolve_resume(args, requested: str | os.PathLike | bool | None) -> str | None:
    """The checkpoint ``Trainer.train(resume_from_checkpoint=requested)`` should load on this rank (collective).

    ``True``: the newest complete checkpoint in ``args.output_dir`` (incomplete newer ones are set aside). When
    every folder there was an interrupted save, training starts from step 0 (a warning says so); when there is no
    checkpoint folder at all, or only damaged ones, a ``ValueError`` as the Trainer's. A path: it is checked, and an
    incomplete one is refused with :class:`IncompleteCheckpointError`.

    The processes that write checkpoints (``args.should_save``: one, or one per node) decide, verifying every
    checksum; then the other ranks look in their own ``output_dir`` (sizes only: on a shared file system they see
    what the writers left, on a node of its own a rank sees its copy). Every rank must arrive at a folder of the same
    name, or none.
    """
    if requested is None or requested is False:
        return None
    writer = getattr(args, "should_save", True)
    outcome = _resolve_here(args.output_dir, requested, decide=True) if writer else None
    _barrier()  # the writers have set aside what they passed over
    if not writer:
        outcome = _resolve_here(args.output_dir, requested, decide=False)
    answers = gather_objects(outcome)
    errors = [o["error"] for o in answers if "error" in o]
    if errors:
        raise (IncompleteCheckpointError if requested is not True else ValueError)(errors[0])
    names = sorted({os.path.basename(os.path.normpath(o["path"])) if o["path"] else "" for o in answers})
    if len(names) > 1:
        raise ValueError(f"The ranks resolved resume_from_checkpoint={requested!r} to different checkpoints "
                         f"({[n or None for n in names]}): every node must see the same checkpoints.")
    return outcome["path"]


def check_weights(directory: str, saved: LWFState, digest: Callable[[], str | None]) -> None:
    """Refuse an LWF state that was saved with other weights than the model now holds.

    ``saved``: the state read from ``directory``; ``digest()``: :func:`weights_sha256` of the loaded weights (called
    on every rank only when ``saved`` records a checksum: it is collective where the weights are sharded). A state
    from a format-1 file records no checksum: a warning."""
    recorded = saved.checksums.get(WEIGHTS_CHECKSUM)
    path = os.path.join(directory, STATE_JSON)
    if not recorded:
        logger.warning(f"{path} records no checksum of the model weights it was saved with (written by an older "
                       "hf_lwf): it cannot be checked that the LWF state belongs to the model being resumed.")
        return
    if digest() != recorded:
        raise IncompleteCheckpointError(
            f"{path} was saved with other model weights than the ones loaded from {directory}: the LWF state does "
            "not belong to this model (a mixed or partly copied checkpoint). Resume from a complete checkpoint "
            "(hf_lwf.last_complete_checkpoint) or copy the whole folder."
        )


def weights_sha256(named_weights: Iterable[tuple[str, torch.Tensor]], keep: bool = True) -> str | None:
    """sha256 of whole weights (name, dtype, shape, bytes), in the order given (the backends give name order).

    Where the weights are gathered from shards (:meth:`hf_lwf.backends.Backend.whole_weights`) every rank iterates;
    ranks that do not need the digest pass ``keep=False`` (and get ``None``)."""
    digest = hashlib.sha256()
    for name, whole in named_weights:
        if keep:
            flat = whole.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{name}|{flat.dtype}|{tuple(whole.shape)}|".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest() if keep else None


# ------------------------------------------------------------------------------------- saving
@contextlib.contextmanager
def writing_checkpoint(args, state, folder: str) -> Iterator[None]:
    """Around the Trainer's ``_save_checkpoint``: the checkpoint becomes complete (marked) or stays ignored.

    Before: a folder already at ``folder`` (a step saved again after resuming from an earlier checkpoint) is set
    aside, and every rank waits for it. During: the Trainer's rotation is held back (``save_total_limit``), so that
    it cannot delete the last complete checkpoint while this one is unfinished; an ``OSError`` (a full disk) is
    raised again saying which folder is incomplete and which checkpoint is the last complete one. After: every rank
    waits for the others, the writer(s) mark the folder complete and rotate (:func:`rotate_checkpoints`).
    """
    writer = getattr(args, "should_save", True)
    if writer and os.path.isdir(folder):
        set_aside_folder(folder, f"step {state.global_step} is being saved again, so this older save of it is kept "
                                 "apart")
    _barrier()
    limit = args.save_total_limit
    args.save_total_limit = None
    try:
        yield
    except OSError as err:
        raise _save_failed(folder, err) from err
    finally:
        args.save_total_limit = limit
    _barrier()  # every rank has written its part
    if not writer:
        return
    try:
        write_marker(folder, state.global_step)
    except OSError as err:
        raise _save_failed(folder, err) from err
    rotate_checkpoints(os.path.dirname(folder), limit, state.best_model_checkpoint, keep=folder)


def mark_complete(args, folder: str, step: int) -> None:
    """Write the marker of a checkpoint the Trainer has finished (a plain ``LWFCallback``'s ``on_save``; collective)."""
    _barrier()
    if getattr(args, "should_save", True) and os.path.isdir(folder):
        try:
            write_marker(folder, step)
        except OSError as err:
            raise _save_failed(folder, err) from err


def rotate_checkpoints(run_dir: str, limit: int | None, best: str | None = None, keep: str | None = None) -> list[str]:
    """``save_total_limit`` over complete checkpoints only: delete the oldest complete ones (by the time their
    marker was written) beyond ``limit``, never ``keep`` (the one just completed) nor ``best``. Folders without a
    marker are never deleted here (a resume sets them aside). A folder is renamed ``_rotated-checkpoint-<step>``
    before it is deleted, so that a kill during the deletion leaves no half-deleted checkpoint behind (the next
    rotation finishes deleting it). Returns the deleted folders."""
    for name in os.listdir(run_dir):
        if name.startswith(_ROTATED) and _CHECKPOINT.match(name[len(_ROTATED):]):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    if not limit or limit <= 0:
        return []
    complete = []
    for _, path in checkpoint_folders(run_dir):
        marker = os.path.join(path, MARKER_NAME)
        with contextlib.suppress(OSError):
            complete.append((os.stat(marker).st_mtime_ns, _step_of(path), path))
    complete = [path for *_, path in sorted(complete)]  # oldest first
    protected = {str(Path(p)) for p in (keep, best) if p}
    surplus = len(complete) - max(limit, len(protected.intersection(complete)))
    deleted = []
    for path in complete:
        if surplus <= 0:
            break
        if path in protected:
            continue
        logger.info(f"Deleting older checkpoint [{path}] due to args.save_total_limit")
        doomed = os.path.join(run_dir, _ROTATED + os.path.basename(path))
        try:
            os.rename(path, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(path)
        surplus -= 1
    return deleted


# ------------------------------------------------------------------------------------- helpers
def _scan(output_dir: str, set_aside: bool, verify: bool, log: bool) -> tuple[str | None, list[tuple[str, str, bool]]]:
    """The newest complete checkpoint, and ``(folder, reason, interrupted)`` of each newer one passed over."""
    folders = checkpoint_folders(output_dir)
    legacy = not any(os.path.isfile(os.path.join(path, MARKER_NAME)) for _, path in folders)
    passed = []
    for _, path in folders:
        reason = incomplete_reason(path, legacy=legacy, verify=verify)
        if reason is None:
            if legacy and log:
                logger.warning(f"{path} has no {MARKER_NAME} (written by a plain Trainer or an older hf_lwf): it is "
                               f"used because its {TRAINER_STATE}, weights and LWF state files are there; their "
                               "contents could not be checked against checksums.")
            return path, passed
        interrupted = not os.path.isfile(os.path.join(path, MARKER_NAME))
        passed.append((path, reason, interrupted))
        if set_aside:
            set_aside_folder(path, reason)
        elif log:
            logger.warning(f"{path} is not a complete checkpoint ({reason}): passed over.")
    return None, passed


def _resolve_here(output_dir: str, requested, decide: bool) -> dict[str, Any]:
    """``{"path": ...}`` or ``{"error": ...}``; ``decide``: a writer's full check (set aside, checksums, errors)."""
    if requested is True and not decide:
        return {"path": _scan(output_dir, set_aside=False, verify=False, log=False)[0]}
    if requested is True:
        if not checkpoint_folders(output_dir):
            return {"error": f"No valid checkpoint found in output directory ({output_dir})"}
        found, passed = _scan(output_dir, set_aside=True, verify=True, log=True)
        if found is None and all(interrupted for *_, interrupted in passed):
            logger.warning(f"No complete checkpoint in {output_dir}: every checkpoint folder there was a save "
                           "interrupted before it finished (set aside, see above), so training starts from step 0.")
        elif found is None:
            damaged = "; ".join(f"{path}: {reason}" for path, reason, _ in passed)
            return {"error": f"No valid checkpoint found in output directory ({output_dir}): {damaged}. They were "
                             f"moved to {os.path.join(output_dir, SET_ASIDE_DIR)}."}
        return {"path": found}
    path = os.fspath(requested)
    if not decide:
        return {"path": path}
    siblings = checkpoint_folders(os.path.dirname(os.path.abspath(path)))
    legacy = not os.path.isfile(os.path.join(path, MARKER_NAME)) and not any(
        os.path.isfile(os.path.join(p, MARKER_NAME)) for _, p in siblings)
    reason = incomplete_reason(path, legacy=legacy)
    if reason is None:
        return {"path": path}
    last = _scan(os.path.dirname(os.path.abspath(path)), set_aside=False, verify=False, log=False)[0]
    hint = f" The last complete checkpoint next to it is {last}." if last else ""
    return {"error": f"Cannot resume from {path}: it is not a complete checkpoint ({reason}).{hint}"}


def _marker_mismatch(folder: str, verify: bool) -> str | None:
    marker = os.path.join(folder, MARKER_NAME)
    try:
        with open(marker, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"its {MARKER_NAME} cannot be read ({err})"
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT or data.get("version") != MARKER_VERSION \
            or not isinstance(data.get("files"), dict):
        return f"its {MARKER_NAME} is not a completion marker of version {MARKER_VERSION}"
    step = _step_of(folder)
    if step is not None and data.get("step") != step:
        return f"its {MARKER_NAME} was written for step {data.get('step')}"
    files = data["files"]
    if TRAINER_STATE not in files:
        return f"its {MARKER_NAME} lists no {TRAINER_STATE}"
    for rel, entry in files.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != entry.get("size"):
            return f"{rel} has {os.path.getsize(path)} bytes where {entry.get('size')} were written"
    if not verify:
        return None
    names = sorted(files)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda rel: file_sha256(os.path.join(folder, rel)), names))
    for rel, digest in zip(names, digests):
        if digest != files[rel].get("sha256"):
            return f"{rel} differs from the file that was written (sha256 mismatch)"
    return None


def _plain_checkpoint_problem(folder: str) -> str | None:
    state_path = os.path.join(folder, TRAINER_STATE)
    if not os.path.isfile(state_path):
        return f"it has no {TRAINER_STATE}, which the Trainer writes after the model, optimizer and RNG states"
    try:
        with open(state_path, encoding="utf-8") as handle:
            step = json.load(handle).get("global_step")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        return f"its {TRAINER_STATE} cannot be read ({err})"
    expected = _step_of(folder)
    if expected is not None and step != expected:
        return f"its {TRAINER_STATE} is of step {step}"
    names = set(os.listdir(folder))
    adapters = any(os.path.isdir(os.path.join(folder, n)) and {"adapter_model.safetensors", "adapter_model.bin"} &
                   set(os.listdir(os.path.join(folder, n))) for n in names)  # PEFT: one folder per adapter
    if not names.intersection(_WEIGHT_FILES) and not any(n.startswith(_WEIGHT_DIR_PREFIX) for n in names) \
            and not adapters:
        return "it holds no model weights"
    if CONFIG_NAME in names and not {STATE_JSON, STATE_TENSORS} <= names:
        return f"it is an LWF checkpoint without {STATE_JSON} and {STATE_TENSORS}"
    return None


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MARKER_NAME:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def _hash_and_flush(path: str) -> tuple[int, str]:
    with open(path, "rb") as handle:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on a read-only descriptor
            os.fsync(handle.fileno())
    return os.path.getsize(path), file_sha256(path)


def _durable_write(directory: str, name: str, text: str) -> str:
    """Write through a flushed temporary file and rename it, then flush the folder: the marker survives a crash of
    the machine, not only of the process."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        target = os.path.join(directory, name)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
    return target


def _save_failed(folder: str, err: OSError) -> OSError:
    last = _scan(os.path.dirname(folder), set_aside=False, verify=False, log=False)[0]
    earlier = f"the last complete checkpoint, {last}, is untouched" if last else "there is no complete checkpoint yet"
    return OSError(err.errno, f"Writing the checkpoint {folder} failed ({err.strerror or err}): it is incomplete and "
                              f"will never be resumed from; {earlier}. Free the space (or fix the cause) and restart "
                              "with resume_from_checkpoint=True.", getattr(err, "filename", None))


def _step_of(folder: str) -> int | None:
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(folder)))
    return int(match.group(1)) if match else None


def _barrier() -> None:
    if is_distributed():
        dist.barrier()
