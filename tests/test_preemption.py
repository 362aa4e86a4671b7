"""Preemptible training: a run SIGKILLed at any moment of a checkpoint write and restarted with
``resume_from_checkpoint=True`` ends with exactly the weights of the uninterrupted run.

A child process trains a tiny Llama (saving every 3 of 9 steps, ``save_total_limit=1``) and is killed at a chosen
moment by tests/scripts/kill_points.py, which wraps every writer of a checkpoint (the model file, the LWF state, the
optimizer, scheduler and RNG files, ``trainer_state.json``, the completion marker, the rotation). It is restarted,
as a job script on a preemptible machine would restart it, until it finishes; its final weights and LWF state must
equal the uninterrupted run's bit for bit (single process, one thread, CPU: the resumed run repeats the same
operations on the same values). Children are forked from the test process, which has run the uninterrupted
reference and so has every module imported: an attempt takes about a second, not an interpreter start. The DDP,
FSDP2 and DeepSpeed ZeRO-2 runs fork two ranks with torchrun's environment (a gloo group on a free port); when one
is killed the other is killed at once, as torchrun, or a preempted machine, does. tests/scripts/preempt_train.py
runs the same ranks under torchrun.

The baseline is a plain ``transformers.Trainer`` killed at the same moments: its restarts fail for good
(``trainer_state.json`` missing, a torn model file), which is what hf_lwf's checkpoints prevent.
"""

import gc
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import threading
import time
import traceback

import pytest
import torch
from conftest import build_tokenizer, learning_dataset, lm_collator, lwf_args, tiny_llama, write_cli_files
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from hf_lwf import LWFCallback, LWFTrainer, last_complete_checkpoint
from hf_lwf.checkpoint import MARKER_NAME, SET_ASIDE_DIR, checkpoint_folders
from hf_lwf.config import config_from_args


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
import kill_points  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_ATTEMPTS = 8
KILLED = -signal.SIGKILL


# ------------------------------------------------------------------------------------------ the child
def _lwf_args(out, **overrides):
    values = dict(max_steps=9, save_strategy="steps", save_steps=3, save_total_limit=1, lwf_unlearn_every=3,
                  lwf_unlearn_batch_size=1, lwf_unlearn_steps=2, lwf_forget_ratio=0.5, lwf_mask_ratio=0.5)
    values.update(overrides)
    return lwf_args(out, **values)


def _plain_args(out, limit):
    base = _lwf_args(out)
    return TrainingArguments(str(out), **{k: getattr(base, k) for k in (
        "max_steps", "per_device_train_batch_size", "learning_rate", "logging_steps", "save_strategy", "save_steps",
        "report_to", "use_cpu", "disable_tqdm", "seed", "data_seed")}, save_total_limit=limit)


def _train(kind: str, out: str) -> dict:
    """One attempt, as a job script would run it: resume when the output folder has a checkpoint."""
    tokenizer = build_tokenizer()
    common = dict(model=tiny_llama(len(tokenizer), seed=1), train_dataset=learning_dataset(tokenizer),
                  processing_class=tokenizer, data_collator=lm_collator(tokenizer))
    started = os.path.isdir(out) and get_last_checkpoint(out) is not None
    if kind == "lwf":  # LWFTrainer: resume_from_checkpoint=True
        trainer = LWFTrainer(args=_lwf_args(out), **common)
        trainer.train(resume_from_checkpoint=True if started else None)
    elif kind == "callback":  # a plain Trainer with LWFCallback: the documented last_complete_checkpoint
        trainer = Trainer(args=_plain_args(out, limit=2), callbacks=[LWFCallback(config_from_args(_lwf_args(out)))],
                          **common)
        trainer.train(resume_from_checkpoint=last_complete_checkpoint(out) if os.path.isdir(out) else None)
    elif kind == "plain":  # the baseline: transformers alone, resume_from_checkpoint=True
        trainer = Trainer(args=_plain_args(out, limit=1), **common)
        trainer.train(resume_from_checkpoint=True if started else None)
    elif kind == "cli":  # hf-lwf train (LWFTrainer), restarted with --resume_from_checkpoint true
        from hf_lwf.app.cli import main

        resume = ["--resume_from_checkpoint", "true"] if started else []
        assert main(["train", os.path.join(os.path.dirname(out), "cli.yaml"), "--output_dir", out, *resume]) == 0
        with open(os.path.join(out, "report.json"), encoding="utf-8") as handle:
            summary = json.load(handle)["lwf_summary"]
        history = [{k: v for k, v in h.items() if "seconds" not in k} for h in summary.pop("history")]
        return {"weights": load_file(os.path.join(out, "model.safetensors")), "lwf": {**summary, "history": history}}
    else:
        raise ValueError(kind)
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, LWFCallback)), None)
    lwf = callback.lwf_state if callback is not None else None
    return {"weights": {n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters()},
            "lwf": None if lwf is None else {**lwf.run_summary(), "forget_indices": lwf.forget_indices,
                                             "history": [{k: v for k, v in h.items() if "seconds" not in k}
                                                         for h in lwf.history]}}


def _child(kind: str, out: str, result: str, moment: str | None, log: str | None, after: float | None) -> None:
    try:
        torch.set_num_threads(1)
        kill_points.install(moment, log)
        if after is not None:  # a kill at a wall-clock moment, wherever the run is
            threading.Timer(after, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
        outcome = _train(kind, out)
        save_file(outcome["weights"], result + ".safetensors")
        with open(result + ".json", "w", encoding="utf-8") as handle:
            json.dump(outcome["lwf"], handle)
        code = 0
    except BaseException:  # noqa: BLE001 - report any failure to the parent through a file
        with open(result + ".error", "w", encoding="utf-8") as handle:
            handle.write(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Run:
    """One output folder trained by successive forked children."""

    def __init__(self, root, kind: str = "lwf"):
        self.root, self.kind = root, kind
        root.mkdir(parents=True, exist_ok=True)
        self.out = str(root / "out")
        self.log = str(root / "events.log")
        self.attempts = 0

    def attempt(self, moment: str | None = None, after: float | None = None) -> int:
        self.attempts += 1
        result = str(self.root / f"result-{self.attempts}")
        process = multiprocessing.get_context("fork").Process(
            target=_child, args=(self.kind, self.out, result, moment, self.log, after))
        gc.freeze()  # the child's garbage collections skip the objects it inherits (the Trainer collects per run)
        try:
            process.start()
        finally:
            gc.unfreeze()
        process.join(timeout=300)
        if process.is_alive():
            process.kill()
            pytest.fail(f"attempt {self.attempts} hung")
        return process.exitcode

    def error(self) -> str:
        path = self.root / f"result-{self.attempts}.error"
        return path.read_text() if path.exists() else ""

    def last_event(self) -> str:
        with open(self.log, encoding="utf-8") as handle:
            return handle.read().splitlines()[-1]

    def finish(self) -> dict:
        """Restart until the run completes (each restart as the job script would: resume when possible)."""
        while self.attempts < MAX_ATTEMPTS:
            code = self.attempt()
            if code == 0:
                return self.result()
            assert code == KILLED, self.error()
        pytest.fail(f"not finished after {MAX_ATTEMPTS} attempts")

    def result(self) -> dict:
        prefix = str(self.root / f"result-{self.attempts}")
        with open(prefix + ".json", encoding="utf-8") as handle:
            return {"weights": load_file(prefix + ".safetensors"), "lwf": json.load(handle)}


def _assert_same_run(actual: dict, expected: dict) -> None:
    assert actual["lwf"] == expected["lwf"]
    assert actual["weights"].keys() == expected["weights"].keys()
    for name, tensor in expected["weights"].items():
        assert torch.equal(actual["weights"][name], tensor), name  # bitwise: the run repeats the same operations


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted LWFTrainer run, in the test process (so that its imports and caches are inherited by every
    forked child), with the events its writers saw (kill_points in counting mode)."""
    root = tmp_path_factory.mktemp("reference")
    log = str(root / "events.log")
    start = time.perf_counter()
    with kill_points.installed(log=log):
        result = _train("lwf", str(root / "out"))
    seconds = time.perf_counter() - start
    with open(log, encoding="utf-8") as handle:
        events = [line.split()[1:3] for line in handle]
    assert result["lwf"]["unlearn_points"] == 3 and result["lwf"]["unlearn_steps"] == 6  # LWF really ran
    return {**result, "events": events, "seconds": seconds, "out": str(root / "out")}


def test_reference_run_writes_every_checkpoint_part_through_the_wrapped_writers(reference):
    names = [name for name, _ in reference["events"]]
    for part in ("model.safetensors", "lwf_state.safetensors", "lwf_state.json", "optimizer.pt", "scheduler.pt",
                 "rng_state.pth", "trainer_state.json", MARKER_NAME):
        assert names.count(part) == 3, part  # once per checkpoint (steps 3, 6, 9): the kill points are real
    assert names.count("rotate") == 2  # save_total_limit=1
    assert [os.path.basename(p) for _, p in checkpoint_folders(reference["out"])] == ["checkpoint-9"]


# A moment of the second save (step 6; the first, step 3, is complete) and the checkpoint that must be the last
# complete one right after the kill. With save_total_limit=1, transformers' own rotation would already have deleted
# checkpoint-3 at the moments after trainer_state.json; hf_lwf rotates only once checkpoint-6 is marked complete.
MOMENTS = [
    ("model.safetensors:2:mid", "checkpoint-3"),  # inside the model write
    ("lwf_state.safetensors:2:mid", "checkpoint-3"),  # inside the LWF state write
    ("optimizer.pt:2:before", "checkpoint-3"),  # after the model and the LWF state
    ("optimizer.pt:2:after", "checkpoint-3"),  # after the optimizer
    ("rng_state.pth:2:mid", "checkpoint-3"),
    ("trainer_state.json:2:before", "checkpoint-3"),  # before trainer_state.json
    ("trainer_state.json:2:mid", "checkpoint-3"),  # a torn trainer_state.json
    (f"{MARKER_NAME}:2:mid", "checkpoint-3"),  # inside the completion marker's write
    (f"{MARKER_NAME}:2:after", "checkpoint-6"),  # complete, before the rotation deletes checkpoint-3
    ("rotate:1:mid", "checkpoint-6"),  # inside the rotation
    ("model.safetensors:1:mid", None),  # inside the first save: nothing complete, the restart starts from step 0
]


@pytest.mark.parametrize("moment,last_complete", MOMENTS, ids=[m for m, _ in MOMENTS])
def test_killed_during_a_save_resumes_to_the_uninterrupted_weights(reference, tmp_path, moment, last_complete):
    run = Run(tmp_path)
    assert run.attempt(moment) == KILLED
    assert run.last_event() == f"0 {' '.join(moment.rsplit(':', 2))}"  # the kill landed at that moment
    found = last_complete_checkpoint(run.out, set_aside=False)
    assert (os.path.basename(found) if found else None) == last_complete
    _assert_same_run(run.finish(), reference)
    assert run.attempts == 2
    if last_complete == "checkpoint-3" and not moment.startswith(MARKER_NAME):  # checkpoint-6 was never complete
        assert os.path.isdir(os.path.join(run.out, SET_ASIDE_DIR, "checkpoint-6"))  # set aside, not deleted
    assert [os.path.basename(p) for _, p in checkpoint_folders(run.out)] == ["checkpoint-9"]
    assert not [n for n in os.listdir(run.out) if n.startswith("_rotated-")]  # an interrupted deletion finished


@pytest.mark.parametrize("seed", [2, 6, 15])
def test_killed_at_seeded_random_writes_until_done(reference, tmp_path, seed):
    """Each of up to 4 attempts is killed at a random write (probability 1/writes of a whole run each, the phase
    drawn too); then the run is restarted until it finishes."""
    run = Run(tmp_path)
    draw = random.Random(seed)
    kills = []
    for _ in range(4):
        code = run.attempt(f"random:{draw.randrange(10**6)}:{1 / len(reference['events'])}")
        if code == 0:
            break
        assert code == KILLED, run.error()
        kills.append(run.last_event())
    result = run.result() if code == 0 else run.finish()
    _assert_same_run(result, reference)
    assert kills  # these seeds kill the first attempt (in the 3rd, 2nd and 3rd save); later ones may be killed too


@pytest.fixture(scope="module")
def forked_seconds(reference, tmp_path_factory):
    """How long an uninterrupted forked attempt takes (its result is the in-process reference's, bit for bit)."""
    run = Run(tmp_path_factory.mktemp("forked"))
    start = time.perf_counter()
    assert run.attempt() == 0, run.error()
    seconds = time.perf_counter() - start
    _assert_same_run(run.result(), reference)
    return seconds


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_at_a_random_wall_clock_moment(reference, forked_seconds, tmp_path, seed):
    """SIGKILL after a seeded random delay, wherever the run is (a step, a save, the start). A delay that outlasts the
    run on a busy machine is halved and the run started again in a fresh folder."""
    delay = random.Random(seed).uniform(0.2, 0.8) * forked_seconds
    for retry in range(4):
        run = Run(tmp_path / f"try{retry}")
        code = run.attempt(after=delay)
        if code == KILLED:
            break
        assert code == 0, run.error()
        delay /= 2
    assert code == KILLED
    _assert_same_run(run.finish(), reference)


# ------------------------------------------------------------------------------------- a full disk
@pytest.mark.parametrize("writer", ["optimizer", "lwf_state"])
def test_full_disk_during_a_save_stops_with_a_clear_error_and_keeps_the_earlier_checkpoint(
        reference, tmp_path, monkeypatch, writer):
    """``OSError(ENOSPC)`` half way through a file of the second save (the Trainer's optimizer file, or the LWF
    state's own atomic write): training stops with an error naming the incomplete folder and the last complete
    checkpoint; nothing of checkpoint-3 is touched, no temporary file is left, and once there is space again the run
    resumes to the uninterrupted weights."""
    import errno

    import hf_lwf.state as state_module

    calls = {"n": 0}

    def full_disk(real, path_of):
        def write(*args, **kwargs):
            path = path_of(args)
            if isinstance(path, str) and kill_points.event_name(path) in ("optimizer.pt", "lwf_state.safetensors"):
                calls["n"] += 1
                if calls["n"] == 2:  # the second save
                    with open(path, "wb") as handle:
                        handle.write(b"\0" * 100)
                    raise OSError(errno.ENOSPC, "No space left on device", path)
            return real(*args, **kwargs)

        return write

    if writer == "optimizer":
        monkeypatch.setattr(torch, "save", full_disk(torch.save, lambda a: a[1] if len(a) > 1 else None))
    else:
        monkeypatch.setattr(state_module, "save_file", full_disk(state_module.save_file, lambda a: a[1]))
    out = str(tmp_path / "out")
    with pytest.raises(OSError) as info:
        _train("lwf", out)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "No space left on device" in message
    assert f"checkpoint {out}/checkpoint-6 failed" in message and "it is incomplete" in message
    assert f"the last complete checkpoint, {out}/checkpoint-3, is untouched" in message
    assert last_complete_checkpoint(out, set_aside=False) == os.path.join(out, "checkpoint-3")
    assert not (tmp_path / "out" / "checkpoint-6" / MARKER_NAME).exists()
    if writer == "lwf_state":  # the callback's own write is atomic: no half file under any name
        assert sorted(n for n in os.listdir(tmp_path / "out" / "checkpoint-6") if "lwf_state" in n) == []
    monkeypatch.undo()
    assert calls["n"] == 2
    _assert_same_run(_train("lwf", out), reference)
    assert os.path.isdir(os.path.join(out, SET_ASIDE_DIR, "checkpoint-6"))


# ------------------------------------------------------------------------ the baseline and the plain callback
@pytest.fixture(scope="module")
def plain_reference(reference, tmp_path_factory):
    run = Run(tmp_path_factory.mktemp("plain-reference"), kind="plain")
    assert run.attempt() == 0, run.error()
    return run.result()


@pytest.mark.parametrize("moment,failure", [
    ("model.safetensors:2:before", "ValueError: Can't find a valid checkpoint at .*checkpoint-6"),
    ("model.safetensors:2:mid", "SafetensorError: Error while deserializing header"),
    ("trainer_state.json:2:before", "FileNotFoundError: .*checkpoint-6/trainer_state.json"),
])
def test_plain_trainer_killed_during_a_save_cannot_resume_but_last_complete_checkpoint_can(
        plain_reference, tmp_path, moment, failure):
    """The failure the issue describes, with transformers alone: ``resume_from_checkpoint=True`` takes the newest
    folder, half written, and every restart stops the same way. ``last_complete_checkpoint`` passes over it (a plain
    Trainer writes no marker: its folders are checked as plain checkpoints) and the run ends as if uninterrupted."""
    import re

    plain = Run(tmp_path, kind="plain")
    assert plain.attempt(moment) == KILLED
    for _ in range(2):  # every restart fails, the same way
        assert plain.attempt() == 1
        assert re.search(failure, plain.error()), plain.error()[-2000:]
    assert last_complete_checkpoint(plain.out) == os.path.join(plain.out, "checkpoint-3")
    assert os.path.isdir(os.path.join(plain.out, SET_ASIDE_DIR, "checkpoint-6"))
    assert plain.attempt() == 0, plain.error()  # resume_from_checkpoint=True now finds checkpoint-3
    _assert_same_run(plain.result(), plain_reference)


@pytest.fixture(scope="module")
def callback_reference(reference, tmp_path_factory):
    run = Run(tmp_path_factory.mktemp("callback-reference"), kind="callback")
    assert run.attempt() == 0, run.error()
    return run.result()


@pytest.mark.parametrize("moment", ["model.safetensors:2:mid", "trainer_state.json:2:before",
                                    "lwf_state.safetensors:2:mid", f"{MARKER_NAME}:2:before"])
def test_plain_callback_resumes_exactly_through_last_complete_checkpoint(callback_reference, tmp_path, moment):
    """``Trainer`` + ``LWFCallback``: the callback marks each checkpoint complete after writing its LWF state (which a
    plain Trainer's ``on_save`` gets only after ``trainer_state.json``), and ``resume_from_checkpoint=
    last_complete_checkpoint(output_dir)`` resumes from the last complete one (save_total_limit=2, see
    docs/preemption.md)."""
    run = Run(tmp_path, kind="callback")
    assert run.attempt(moment) == KILLED
    assert last_complete_checkpoint(run.out, set_aside=False) == os.path.join(run.out, "checkpoint-3")
    _assert_same_run(run.finish(), callback_reference)
    assert os.path.isdir(os.path.join(run.out, SET_ASIDE_DIR, "checkpoint-6"))


# ------------------------------------------------------------------------------------------ hf-lwf train
@pytest.fixture(scope="module")
def cli_reference(reference, tmp_path_factory):
    """``hf-lwf train`` files and config (LWFTrainer, saving every 2 of 6 steps), and its uninterrupted run."""
    import yaml

    files = write_cli_files(tmp_path_factory.mktemp("cli-files"))
    config = {"model_name_or_path": str(files / "model"), "dataset": str(files / "learn.jsonl"),
              "lwf_forget_prompts": str(files / "forget.txt"), "max_steps": 6, "per_device_train_batch_size": 4,
              "learning_rate": 1e-3, "lwf_unlearn_every": 2, "lwf_max_new_tokens": 6, "lwf_unlearn_optimizer": "sgd",
              "lwf_unlearn_lr": 0.05, "lwf_forget_loss_cap": 50.0, "report_to": "none", "save_strategy": "steps",
              "save_steps": 2, "save_total_limit": 1, "use_cpu": True, "disable_tqdm": True, "seed": 0, "plots": False}
    (files / "cli.yaml").write_text(yaml.safe_dump(config))
    run = Run(tmp_path_factory.mktemp("cli-reference"), kind="cli")
    shutil.copy(files / "cli.yaml", run.root / "cli.yaml")
    assert run.attempt() == 0, run.error()
    return {**run.result(), "config": files / "cli.yaml"}


@pytest.mark.parametrize("moment", ["model.safetensors:2:mid", "trainer_state.json:2:before"])
def test_cli_train_killed_during_a_save_resumes_to_the_uninterrupted_weights(cli_reference, tmp_path, moment):
    """``hf-lwf train`` killed in its second save, then restarted with ``--resume_from_checkpoint true``, ends with
    the uninterrupted command's model file (every tensor bit for bit) and LWF summary."""
    run = Run(tmp_path, kind="cli")
    shutil.copy(cli_reference["config"], run.root / "cli.yaml")
    assert run.attempt(moment) == KILLED
    assert last_complete_checkpoint(run.out, set_aside=False) == os.path.join(run.out, "checkpoint-2")
    _assert_same_run(run.finish(), cli_reference)
    assert run.attempts == 2


# ------------------------------------------------------------------------- DDP, FSDP2, DeepSpeed ZeRO-2
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, root: str, engine: str, phases: str, moment: str | None, log: str) -> None:
    """One rank of a 2-rank gloo group, forked from the test process as torchrun would start it (its environment)."""
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)  # the test process's single-process state
        GradientState._reset_state()
        torch.set_num_threads(1)
        import preempt_train  # tests/scripts; its import keeps accelerate's FSDP plugin on CPU (in this rank only)

        if moment is not None:
            kill_points.install(moment, log)
        for phase in phases.split(","):
            preempt_train.run(root, engine, phase)
        torch.distributed.barrier()
        code = 0
    except BaseException:  # noqa: BLE001 - report any failure to the test through a file
        with open(os.path.join(root, f"rank{rank}.error"), "a", encoding="utf-8") as handle:
            handle.write(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(root, engine: str, phases: str = "run", moment: str | None = None, rank: int = 0) -> list[int]:
    """Start 2 ranks; ``moment`` kills ``rank`` there. When a rank dies the others are killed at once, as torchrun
    (or a preempted machine) does; returns the ranks' exit codes (``-SIGKILL`` for killed ones)."""
    port = _free_port()
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_rank, args=(r, port, str(root), engine, phases,
                                                      moment if r == rank else None, str(root / "events.log")))
                 for r in range(2)]
    gc.freeze()
    try:
        for process in processes:
            process.start()
    finally:
        gc.unfreeze()
    deadline = time.monotonic() + 300
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in processes):
            for p in processes:
                if p.is_alive():
                    p.kill()
        time.sleep(0.05)
    for p in processes:
        if p.is_alive():
            p.kill()
        p.join()
    return [p.exitcode for p in processes]


def _rank_errors(root) -> str:
    return "".join((root / f"rank{r}.error").read_text() for r in range(2) if (root / f"rank{r}.error").exists())


def _phase_result(root, phase: str) -> dict:
    return {"weights": load_file(str(root / f"{phase}.safetensors")),
            "lwf": json.loads((root / f"{phase}.json").read_text())}


# Two kills per engine, each at the second save of the attempt (step 4 of 6: checkpoint-2 is complete), on one rank
# while the other keeps writing until it is killed too; then one attempt to the end and the uninterrupted run.
CHAINS = {
    "ddp": [(1, "rng_state_1.pth:2:mid"), (0, "model.safetensors:1:mid")],  # rank 1 inside its RNG file; rank 0
    "fsdp": [(1, "save_fsdp_optimizer:2:before"), (0, "lwf_state.safetensors:1:mid")],  # after the model shards
    "zero2": [(1, "zero_pp_rank_1_mp_rank_00_optim_states.pt:2:mid"), (0, "trainer_state.json:1:before")],
}


# Imported once in the test process, so that the forked ranks do not each import them (seconds per rank).
ENGINE_MODULES = {"fsdp": ["torch.distributed.checkpoint", "torch.distributed.fsdp", "accelerate.utils.fsdp_utils"],
                  "zero2": ["deepspeed", "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2",
                            "deepspeed.runtime.zero.muon.muon_optimizer", "transformers.integrations.deepspeed"]}


@pytest.mark.preemption_matrix
@pytest.mark.parametrize("engine", sorted(CHAINS))
def test_two_ranks_killed_during_saves_resume_to_the_uninterrupted_weights(reference, tmp_path, engine):
    import importlib

    if engine == "zero2":
        pytest.importorskip("deepspeed")
    for module in ENGINE_MODULES.get(engine, []):
        importlib.import_module(module)
    out = tmp_path / "run"
    for rank, moment in CHAINS[engine]:
        codes = launch(tmp_path, engine, moment=moment, rank=rank)
        assert codes[rank] == KILLED, (codes, _rank_errors(tmp_path)[-3000:])
        assert all(code != 0 for code in codes)  # the other rank was stopped before it finished
        with open(tmp_path / "events.log", encoding="utf-8") as handle:
            assert handle.read().splitlines()[-1] == f"{rank} {' '.join(moment.rsplit(':', 2))}"
        found = last_complete_checkpoint(str(out), set_aside=False)
        assert found == str(out / "checkpoint-2")  # the save of step 4 never counts
        for name in os.listdir(tmp_path):
            if name.endswith(".error"):
                os.remove(tmp_path / name)
    codes = launch(tmp_path, engine, phases="run,reference")
    assert codes == [0, 0], _rank_errors(tmp_path)[-5000:]
    resumed, uninterrupted = _phase_result(tmp_path, "run"), _phase_result(tmp_path, "reference")
    assert uninterrupted["lwf"]["unlearn_steps"] == 6  # 3 unlearning points, 2 ascent steps each
    _assert_same_run(resumed, uninterrupted)
    assert os.path.isdir(out / SET_ASIDE_DIR / "checkpoint-4")  # the interrupted saves, set aside
    assert [os.path.basename(p) for _, p in checkpoint_folders(str(out))] == ["checkpoint-6"]


# ---------------------------------------------------------------------------- a restart after the last checkpoint
@pytest.mark.parametrize("kind", ["lwf", "callback"])
def test_restart_after_the_last_checkpoint_changes_nothing(reference, tmp_path, kind):
    """A kill after the final checkpoint (before the job script saw the run end): transformers resumes it with one
    step beyond max_steps. LWF skips that step (no Fisher update, no unlearning point); LWFTrainer also gives it no
    forward pass, so the optimizer changes no weight even at a learning rate above zero."""
    run = Run(tmp_path, kind)
    assert run.attempt() == 0, run.error()
    finished = run.result()
    if kind == "lwf":
        _assert_same_run(finished, reference)
    assert run.attempt() == 0, run.error()  # the job script's restart: it resumes the final checkpoint
    assert "checkpoint-10" in os.listdir(run.out)  # transformers' extra step ran
    again = run.result()
    assert again["lwf"] == finished["lwf"]
    if kind == "lwf":
        _assert_same_run(again, reference)


def test_lwftrainer_step_beyond_max_steps_moves_no_weight_at_a_constant_rate(tmp_path):
    tokenizer = build_tokenizer()
    out = str(tmp_path / "out")

    def train(resume):
        trainer = LWFTrainer(args=_lwf_args(out, lr_scheduler_type="constant"), model=tiny_llama(len(tokenizer), seed=1),
                             train_dataset=learning_dataset(tokenizer), processing_class=tokenizer,
                             data_collator=lm_collator(tokenizer))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    first, weights = train(None)
    assert first.optimizer.param_groups[0]["lr"] > 0
    again, resumed = train(True)
    assert again.state.global_step == first.state.global_step + 1  # transformers' extra step ran
    assert all(torch.equal(resumed[n], w) for n, w in weights.items())
    assert again.lwf_run.state.fisher_updates == first.lwf_run.state.fisher_updates
