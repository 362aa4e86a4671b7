"""LWF under FSDP2 (``fully_shard``) on 2 CPU ranks (gloo), against the same computation on an unsharded copy.

transformers/accelerate build FSDP only on GPUs (on CPU ``fsdp=...`` falls back to DDP), so the script shards a
tiny model with ``fully_shard`` itself and drives LWF's pieces and the callback, wired as ``LWFTrainer`` wires it,
through the Trainer's event order (tests/scripts/fsdp_lwf.py). Models: a tiny Llama, a tiny GPT-2 (tied
embeddings, Conv1D) and the Llama with PEFT LoRA adapters (only the adapters are trainable and sharded state).
"""

import json
import math
import os
import subprocess
import sys

import pytest


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "fsdp_lwf.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if completed.returncode != 0:
        pytest.fail(f"torchrun failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _close(a, b, rtol=1e-4):
    scale = max(abs(x) for x in a)
    return len(a) == len(b) and scale > 0 and all(math.isclose(x, y, rel_tol=rtol, abs_tol=rtol * scale) for x, y in zip(a, b))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "lora"])
def test_state_is_sharded_like_the_parameters_and_equals_the_unsharded_one(ranks, arch):
    pieces = [r[arch]["pieces"] for r in ranks]
    assert ranks[0]["world_size"] == 2
    for p in pieces:
        assert p["fisher_dtensor"]  # F and theta_ref are DTensor shards
        if arch == "lora":
            assert p["fisher_numel"] < 5000  # the adapters only
        assert p["fisher_diff"] == 0.0 and p["reference_diff"] == 0.0 and p["step_diff"] == 0.0
        assert p["fisher_scale"] > 0
    # each rank holds its own rows only: together exactly one whole copy
    assert pieces[0]["fisher_local_numel"] + pieces[1]["fisher_local_numel"] == pieces[0]["fisher_numel"]
    assert max(p["fisher_local_numel"] for p in pieces) < 0.6 * pieces[0]["fisher_numel"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "lora"])
def test_self_generation_scoring_empirical_fisher_and_ascent_equal_the_unsharded_run(ranks, arch):
    for rank in ranks:
        p = rank[arch]["pieces"]
        assert p["self_data_equal"] and p["self_data_size"] >= 4
        for mode in ("deviation", "alignment"):
            plain, sharded = p[f"scores_{mode}"]
            assert _close(plain, sharded), mode  # partial sums over the shards, all-reduced
            assert p[f"threshold_{mode}"][0] == p[f"threshold_{mode}"][1] > 0  # the radix select across ranks
        assert p["empirical_diff"] <= 1e-4 * p["empirical_scale"]
        plain, sharded = p["ascent"]
        assert plain["applied"] == sharded["applied"] == 1 and plain["kept"] == sharded["kept"] == 4
        assert math.isclose(plain["grad_norm"], sharded["grad_norm"], rel_tol=1e-5)
        assert p["ascent_diff"] < 1e-7
        assert p["restored_exact"]
        assert "must run through `LWFTrainer`" in p["plain_callback_refused"]  # a hand-sharded model, plain callback
    assert ranks[0][arch]["pieces"]["saved_whole_diff"] == 0.0  # the checkpoint holds whole tensors
    assert ranks[0][arch]["pieces"]["scores_deviation"] == ranks[1][arch]["pieces"]["scores_deviation"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "lora"])
def test_callback_run_under_fsdp_equals_the_unsharded_run_and_resumes_exactly(ranks, arch):
    for rank in ranks:
        c = rank[arch]["callback"]
        plain, sharded, resumed = c["plain"], c["sharded"], c["resumed"]
        assert plain["unlearn_points"] == sharded["unlearn_points"] == 3
        assert plain["unlearn_steps"] == sharded["unlearn_steps"] == 6  # unlearning really happened
        assert plain["forget_indices"] == sharded["forget_indices"] and sharded["forget_indices"]
        assert _close(plain["scores"], sharded["scores"])
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(plain["forget_loss"], sharded["forget_loss"]))
        assert c["fisher_diff"] <= 1e-4 * c["fisher_scale"]
        assert c["final_diff"] < 1e-2 * c["moved"]  # the weights after 6 steps and 3 unlearning points
        # interrupted after step 4 and restored from checkpoint-4 by a new callback: exactly the uninterrupted run
        assert resumed == sharded and c["resumed_diff"] == 0.0
    assert ranks[0][arch]["callback"]["sharded"] == ranks[1][arch]["callback"]["sharded"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "lora"])
def test_fsdp_bf16_mixed_precision_unlearns_with_fp32_sharded_state(ranks, arch):
    for rank in ranks:
        c = rank[arch]["callback"]
        bf16, plain = c["bf16"], c["plain"]
        assert c["bf16_state"]["dtensor_fp32"] and c["bf16_state"]["fisher_scale"] > 0
        assert bf16["unlearn_points"] == 3 and bf16["unlearn_steps"] == 6 and bf16["fisher_updates"] == 6
        assert len(bf16["forget_indices"]) == len(plain["forget_indices"])
        assert all(math.isfinite(x) for x in bf16["scores"] + bf16["forget_loss"])
        assert max(bf16["forget_loss"]) > bf16["forget_loss"][0]  # the ascent steps raise the forget loss
    assert ranks[0][arch]["callback"]["bf16"] == ranks[1][arch]["callback"]["bf16"]  # ranks agree


TRAINER_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "fsdp_trainer.py")


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """LWFTrainer through accelerate's FSDP2 path on CPU (see the script), and the same run under DDP."""
    out = tmp_path_factory.mktemp("fsdp_trainer")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for phase in ("ddp", "fsdp", "crash", "resume"):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   TRAINER_SCRIPT, str(out), phase]
        completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if completed.returncode != 0:
            pytest.fail(f"torchrun ({phase}) failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}")
    runs = {phase: [json.loads((out / f"{phase}-rank{r}.json").read_text()) for r in range(2)]
            for phase in ("ddp", "fsdp", "resume")}
    runs["checkpoint"] = sorted(os.listdir(out / "split" / "checkpoint-4"))
    return runs


def test_lwf_trainer_under_accelerate_fsdp2_equals_the_ddp_run(trainer_runs):
    for ddp, fsdp in zip(trainer_runs["ddp"], trainer_runs["fsdp"]):
        assert not ddp["fsdp_enabled"] and not ddp["state_sharded"]
        assert fsdp["fsdp_enabled"] and fsdp["params_sharded"] and fsdp["state_sharded"]
        assert fsdp["unlearn_steps"] == ddp["unlearn_steps"] == 6 and fsdp["fisher_updates"] == 6
        assert fsdp["forget_indices"] == ddp["forget_indices"] and fsdp["forget_indices"]
        assert _close(ddp["scores"], fsdp["scores"])
        for a, b in zip(ddp["history"], fsdp["history"]):
            assert math.isclose(a["lwf/forget_loss"], b["lwf/forget_loss"], rel_tol=1e-5)
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(ddp["weights"], fsdp["weights"]))
        assert fsdp["checkpoints"] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert trainer_runs["fsdp"][0] == trainer_runs["fsdp"][1]  # both ranks report the same whole weights and state


def test_lwf_trainer_under_fsdp2_resumes_a_sharded_checkpoint_exactly(trainer_runs):
    checkpoint = trainer_runs["checkpoint"]
    assert {"lwf_state.safetensors", "lwf_state.json", "lwf_config.json", "_lwf_self_data"} <= set(checkpoint)
    assert "pytorch_model_fsdp_0" in checkpoint  # the Trainer's own sharded (torch.distributed.checkpoint) save
    for full, resumed in zip(trainer_runs["fsdp"], trainer_runs["resume"]):
        assert resumed == full
