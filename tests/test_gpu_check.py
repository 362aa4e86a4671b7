"""The GPU acceptance command's CPU dry run (what CI runs): every check passes on a tiny model on the CPU."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_passes(tmp_path):
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("HF_LWF_GPU_CHECK_DRY_RUN", None)
    completed = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run"],
                               capture_output=True, text=True, env=env, timeout=480, cwd=str(tmp_path))
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    assert "[gpu_check] PASSED" in completed.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True
    results = summary["results"]
    assert set(results) == {"bf16", "lora_gc", "resume", "fsdp", "zero3"}
    for name in ("bf16", "lora_gc", "resume"):
        assert "error" not in results[name] and results[name]["unlearn_steps"] > 0, results[name]
    assert results["resume"]["max_relative_weight_difference"] < 1e-2
    assert "skipped" in results["fsdp"]
    zero3 = results["zero3"]  # a one-rank DeepSpeed ZeRO-3 run through the Trainer, on the CPU
    assert "error" not in zero3 and "skipped" not in zero3, zero3
    assert zero3["unlearn_steps"] > 0 and zero3["fisher_updates"] > 0 and zero3["weights"] == "torch.float32"
    bench = json.loads((tmp_path / "bench.json").read_text())
    row = bench["models"]["tiny"]["fisher_bf16"]
    assert row["weights"] == "bfloat16" and row["fisher"] == "float32" and row["overhead"] > 0


def test_gpu_check_timeouts_fit_the_eight_minute_budget():
    """The GPU command runs in under 8 minutes; its parts' timeouts bound it."""
    with open(os.path.join(ROOT, "benchmarks", "gpu_check.sh"), encoding="utf-8") as handle:
        script = handle.read()
    start = script.index("\nelse\n")
    gpu_part = script[start:script.index("\nfi\n", start)]  # the branch that runs on a GPU
    timeouts = [int(t) for t in re.findall(r"^\s*timeout (\d+) ", gpu_part, flags=re.M)]
    assert len(timeouts) == len([line for line in gpu_part.splitlines() if "python" in line]) == 3
    assert sum(timeouts) < 8 * 60, timeouts


def test_gpu_check_model_flag_reaches_the_model_loader(monkeypatch):
    """``--model tiny`` runs the GPU checks without the SmolLM2 file; the torchrun workers read it from the env."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import gpu_check

    monkeypatch.setenv("HF_LWF_GPU_CHECK_MODEL", "smollm2")  # recorded, so the test leaves the env as it found it
    monkeypatch.delenv("HF_LWF_GPU_CHECK_DRY_RUN", raising=False)
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--model", "tiny"]) == 2  # no CUDA here: refused with a message, after the flag is read
    assert os.environ["HF_LWF_GPU_CHECK_MODEL"] == "tiny"
    model, tokenizer = gpu_check._model(dry=False)
    assert model.config.hidden_size == 64 and model.dtype == gpu_check.torch.bfloat16


def test_gpu_scale_dry_run_records_every_field(tmp_path):
    """``benchmarks/gpu_scale.py --dry-run``: the 1B and 8B-LoRA measurements on tiny shapes on the CPU."""
    out = tmp_path / "scale.json"
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_scale.py"), "--dry-run",
                                "--profile", "--out", str(out)], capture_output=True, text=True, timeout=600,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert completed.returncode == 0, completed.stderr[-3000:]
    scale = json.loads(out.read_text())["scale"]
    assert scale["dry_run"] is True and set(scale["models"]) == {"llama-1b", "llama-8b-lora"}
    for name, result in scale["models"].items():
        assert result["trainable_parameters"] > 0
        assert result["step"]["seconds"]["vanilla_step"] > 0 and "overhead" in result["step"]
        for key in ("deviation_over_forward_backward", "alignment_over_forward_backward",
                    "empirical_fisher_over_forward_backward"):
            assert result["scoring"][key] > 0, (name, key)
        assert result["generation"]["tokens_per_second"] > 0
        assert result["trainer"]["lwf"]["summary"]["unlearn_steps"] > 0  # the LWF run took real ascent steps
        assert "trainer_overhead" in result and result["profile"]["deviation"]["top"]
    lora, full = scale["models"]["llama-8b-lora"], scale["models"]["llama-1b"]
    assert lora["trainable_parameters"] < full["trainable_parameters"]  # only the adapters train
