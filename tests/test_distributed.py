"""LWF under 2-process DDP on CPU (torchrun): ranks stay in sync through scoring and unlearning."""

import json
import os
import subprocess
import sys

import pytest


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_train.py")


def test_two_rank_ddp_keeps_ranks_identical(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               SCRIPT, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if completed.returncode != 0:
        pytest.fail(f"torchrun failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["scores"] == ranks[1]["scores"] and len(ranks[0]["scores"]) > 1
    assert ranks[0]["forget_indices"] == ranks[1]["forget_indices"]
    assert ranks[0]["unlearn_steps"] == ranks[1]["unlearn_steps"] == 4
