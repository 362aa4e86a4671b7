"""``LWFTrainer`` under DeepSpeed ZeRO on 2 CPU ranks (gloo), against the DDP run of the same config.

tests/scripts/deepspeed_trainer.py runs the Trainer's own DeepSpeed path (``TrainingArguments(deepspeed={...},
use_cpu=True)``, DeepSpeed's CPU accelerator): engine, ZeRO-partitioned optimizer, DeepSpeed checkpoints and their
resume. Every torchrun has a timeout, so a deadlock (a rank that skips a collective) fails the test instead of
hanging CI.

DeepSpeed JIT-compiles its shared-memory communication op (``deepspeed_shm_comm``, g++ with OpenMP) when its
communication backend starts, whatever ``DS_BUILD_OPS`` says; torch caches the build in ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``), so only the first torchrun of a machine pays it (about 40-60 s on 2 cores).
The DeepSpeed phases (ZeRO-2 and ZeRO-3, each a full run, a run stopped after checkpoint-4 and its resume) share one
torchrun for that reason. The ZeRO-3 config sets ``stage3_param_persistence_threshold: 0``: by default DeepSpeed
keeps parameters under 1e5 elements (all of a tiny model's) whole on every rank.
"""

import json
import math
import os
import subprocess
import sys

import pytest


pytest.importorskip("deepspeed")

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "deepspeed_trainer.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_TIMEOUT = 420  # seconds for one torchrun, the first shm-op build included: a hang fails, it never blocks CI


def _torchrun(out, phases: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
               str(out), phases]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    try:
        completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-3000:], (err.stderr or b"")[-3000:]
        pytest.fail(f"torchrun ({phases}) did not finish in {HANG_TIMEOUT} s (a deadlock?):\n{tail}")
    if completed.returncode != 0:
        pytest.fail(f"torchrun ({phases}) failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    _torchrun(out, "ddp,ddpemp,ddppre")
    _torchrun(out, "zero2,zero2-crash,zero2-resume,zero2emp,zero2pre,zero3,zero3-crash,zero3-resume,zero3emp,zero3pre")
    phases = ("ddp", "ddpemp", "ddppre", "zero2", "zero2-resume", "zero2emp", "zero2pre", "zero3", "zero3-resume",
              "zero3emp", "zero3pre")
    result = {phase: [json.loads((out / f"{phase}-rank{r}.json").read_text()) for r in range(2)] for phase in phases}
    for stage in (2, 3):
        result[f"checkpoint{stage}"] = sorted(os.listdir(out / f"zero{stage}-split" / "checkpoint-4"))
    result["out"] = out
    return result


def _close(a, b, rel):
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel, abs_tol=0.0) for x, y in zip(a, b))


@pytest.mark.parametrize("stage", [2, 3])
def test_the_default_preconditioned_ascent_under_zero_equals_the_ddp_run(runs, stage):
    """The default ascent reads v_hat from DeepSpeed's partitioned optimizer state (read-only): same D_U and counts
    as DDP, final weights within 1e-6 relative, and the learning optimizer's state bitwise untouched by the ascent."""
    for ddp, zero in zip(runs["ddppre"], runs[f"zero{stage}pre"]):
        assert zero["engine_stage"] == zero["lwf_stage"] == stage
        assert zero["forget_indices"] == ddp["forget_indices"] and ddp["forget_indices"]
        assert zero["unlearn_steps"] == ddp["unlearn_steps"] == 6
        assert all(m > 0 for m in zero["ascent_moved"]) and len(zero["ascent_moved"]) == 3
        assert not any(zero["optimizer_touched"]) and not any(ddp["optimizer_touched"])
        assert len(zero["optimizer_touched"]) == 3
        assert _close(ddp["weights"], zero["weights"], 1e-6) and math.isclose(ddp["checksum"], zero["checksum"],
                                                                             rel_tol=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_lwf_trainer_under_zero_equals_the_ddp_run(runs, stage):
    for ddp, zero in zip(runs["ddp"], runs[f"zero{stage}"]):
        assert not ddp["deepspeed"] and zero["deepspeed"] and zero["engine_stage"] == zero["lwf_stage"] == stage
        assert zero["self_data"] == ddp["self_data"] and len(ddp["self_data"]) >= 4  # D_self identical
        assert zero["forget_indices"] == ddp["forget_indices"] and ddp["forget_indices"]  # D_U identical
        assert max(abs(x) for x in ddp["scores"]) > 0
        scale = max(abs(x) for x in ddp["scores"])
        assert all(abs(x - y) <= 1e-6 * scale for x, y in zip(ddp["scores"], zero["scores"]))
        assert zero["fisher_updates"] == ddp["fisher_updates"] == 6  # the online Fisher read at every step
        assert zero["fisher"].keys() == ddp["fisher"].keys()
        assert _close(list(ddp["fisher"].values()), list(zero["fisher"].values()), 1e-6)  # before clipping, as DDP
        assert zero["unlearn_steps"] == ddp["unlearn_steps"] == 6  # 3 points x 2 ascent steps, all applied
        assert len(zero["history"]) == len(ddp["history"]) == 3
        assert _close([h["lwf/forget_loss"] for h in ddp["history"]], [h["lwf/forget_loss"] for h in zero["history"]],
                      1e-6)
        assert _close(ddp["weights"], zero["weights"], 1e-6) and math.isclose(ddp["checksum"], zero["checksum"],
                                                                             rel_tol=1e-6)
        assert zero["checkpoints"] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert runs[f"zero{stage}"][0] == runs[f"zero{stage}"][1]  # both ranks end with the same weights and state


@pytest.mark.parametrize("stage", [2, 3])
def test_the_ascent_moves_the_weights_under_deepspeed_as_under_ddp(runs, stage):
    for ddp, zero in zip(runs["ddp"], runs[f"zero{stage}"]):
        assert len(zero["ascent_moved"]) == 3 and min(zero["ascent_moved"]) > 1e-3  # every point moved the weights
        assert _close(ddp["ascent_moved"], zero["ascent_moved"], 1e-4)  # by the DDP run's amount


@pytest.mark.parametrize("stage", [2, 3])
def test_empirical_fisher_under_zero_gives_the_ddp_scores(runs, stage):
    for ddp, zero in zip(runs["ddpemp"], runs[f"zero{stage}emp"]):
        assert zero["engine_stage"] == stage and zero["fisher_updates"] == ddp["fisher_updates"] == 0  # not online
        scale = max(abs(x) for x in ddp["scores"])
        assert scale > 0 and all(abs(x - y) <= 1e-6 * scale for x, y in zip(ddp["scores"], zero["scores"]))
        assert zero["forget_indices"] == ddp["forget_indices"] and ddp["forget_indices"]
        assert zero["unlearn_steps"] == ddp["unlearn_steps"] == 6
        assert _close(ddp["weights"], zero["weights"], 1e-6)
        assert scale != max(abs(x) for x in runs["ddp"][0]["scores"])  # a different Fisher: different scores


def test_state_follows_the_parameters_whole_under_zero2_one_slice_per_rank_under_zero3(runs):
    whole = runs["ddp"][0]["state_numel"]  # F and theta_ref, whole, as DDP keeps them
    assert whole > 0 and all(r["state_numel"] == whole for r in runs["zero2"])  # ZeRO-2: whole weights, whole state
    zero3 = [r["state_numel"] for r in runs["zero3"]]
    assert sum(zero3) == whole and max(zero3) < 0.6 * whole  # ZeRO-3: each rank its slices, together one copy


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_run_resumes_a_deepspeed_checkpoint_exactly(runs, stage):
    checkpoint = runs[f"checkpoint{stage}"]
    assert {"lwf_state.safetensors", "lwf_state.json", "lwf_config.json", "_lwf_self_data"} <= set(checkpoint)
    assert "global_step4" in checkpoint and "latest" in checkpoint  # DeepSpeed's own checkpoint format
    for full, resumed in zip(runs[f"zero{stage}"], runs[f"zero{stage}-resume"]):
        full, resumed = dict(full), dict(resumed)
        assert resumed.pop("ascent_moved") == full.pop("ascent_moved")[-1:]  # the one point after step 4
        assert resumed.pop("optimizer_touched") == full.pop("optimizer_touched")[-1:]
        assert resumed == full  # weights, F, scores, D_U, history: bitwise the uninterrupted run


@pytest.mark.parametrize("stage", [2, 3])
def test_lwf_state_of_a_deepspeed_checkpoint_is_the_unsharded_format(runs, stage):
    """Whole tensors in the single-process format: the LWF part resumes at any world size or without DeepSpeed."""
    import torch

    from hf_lwf.state import LWFState

    ddp = LWFState.load(str(runs["out"] / "ddp" / "checkpoint-4"))
    zero = LWFState.load(str(runs["out"] / f"zero{stage}-split" / "checkpoint-4"))
    assert zero.fisher.keys() == ddp.fisher.keys() and zero.reference.keys() == ddp.reference.keys() and ddp.fisher
    for group in ("fisher", "reference"):
        for name, whole in getattr(ddp, group).items():
            tensor = getattr(zero, group)[name]
            assert tensor.shape == whole.shape and tensor.dtype == whole.dtype
            assert torch.allclose(tensor, whole, rtol=1e-5, atol=1e-6 * float(whole.abs().max())), (group, name)
    assert zero.forget_indices == ddp.forget_indices and zero.fisher_updates == ddp.fisher_updates == 4

