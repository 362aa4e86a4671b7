"""LWF under 2-process DDP on CPU (torchrun): ranks stay in sync through scoring and unlearning."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_train.py")


def test_two_rank_ddp_equals_a_single_process_run(tmp_path):
    """2 ranks x batch 2 under DDP against ONE process with batch 4: same scores, D_U, ascent count and weights.

    The ascent gradients are summed in place, one all-reduce per parameter gradient (no flat copy of them all)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               SCRIPT, str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if completed.returncode != 0:
        pytest.fail(f"torchrun failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    single = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "single"), "single"], capture_output=True,
                            text=True, env=env, timeout=300)
    if single.returncode != 0:
        pytest.fail(f"single-process run failed:\n{single.stdout[-3000:]}\n{single.stderr[-3000:]}")
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    alone = json.loads((tmp_path / "single" / "single.json").read_text())
    assert ranks[0]["world_size"] == 2 and alone["world_size"] == 1
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["scores"] == ranks[1]["scores"] and len(ranks[0]["scores"]) > 1
    assert ranks[0]["forget_indices"] == ranks[1]["forget_indices"] == alone["forget_indices"]
    assert ranks[0]["unlearn_steps"] == ranks[1]["unlearn_steps"] == alone["unlearn_steps"] == 4
    scale = max(abs(s) for s in alone["scores"])
    assert max(abs(a - b) for a, b in zip(ranks[0]["scores"], alone["scores"])) <= 1e-5 * scale
    for name, expected in alone["weights"].items():
        got = torch.tensor(ranks[0]["weights"][name])
        torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6, msg=name)
    for rank in ranks:
        collectives = rank["ascent_collectives"]
        assert collectives  # the ascent steps reduced their gradients
        # in place, on the gradient itself; the one other all-reduce holds the batch's loss statistics (3 numbers and
        # a kept flag per row of the 3-sample batch)
        assert all(own_grad for n, own_grad in collectives if n > 3 + 3)
        assert max(n for n, _ in collectives) <= rank["largest_parameter"]


MULTINODE = os.path.join(os.path.dirname(__file__), "scripts", "multinode_train.py")


def _two_nodes(base, phase):
    """Two torchrun "nodes" on this machine (one process each), rendezvous on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             MULTINODE, str(base), phase],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for rank in range(2)
    ]
    for node in nodes:
        output, _ = node.communicate(timeout=300)
        if node.returncode != 0:
            pytest.fail(f"node failed in phase {phase}:\n{output[-4000:]}")


def test_two_nodes_without_shared_storage_resume_exactly(tmp_path):
    """Node 1 gets only the checkpoint folder (as a user syncs it), never the main node's output folder."""
    _two_nodes(tmp_path / "full", "full")
    _two_nodes(tmp_path / "split", "crash")
    main, other = tmp_path / "split" / "node0", tmp_path / "split" / "node1"
    assert not (other / "_lwf_self_data").exists()
    shutil.copytree(main / "checkpoint-4", other / "checkpoint-4", dirs_exist_ok=True)
    _two_nodes(tmp_path / "split", "resume")
    full = [json.loads((tmp_path / "full" / n / "result.json").read_text()) for n in ("node0", "node1")]
    resumed = [json.loads((tmp_path / "split" / n / "result.json").read_text()) for n in ("node0", "node1")]
    assert full[0]["world_size"] == 2 and full[0]["unlearn_steps"] == 4
    assert full[0]["checksum"] == full[1]["checksum"]
    for node in range(2):
        assert resumed[node]["checksum"] == pytest.approx(full[node]["checksum"], rel=1e-6)
        assert resumed[node]["history"] == full[node]["history"]
        assert resumed[node]["forget_indices"] == full[node]["forget_indices"]
