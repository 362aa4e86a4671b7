"""The GPU acceptance checks behind benchmarks/gpu_check.sh (one GPU, under 8 minutes).

    python benchmarks/gpu_check.py                 # SmolLM2-135M on the GPU (hf_lwf.app.models loads it offline)
    python benchmarks/gpu_check.py --dry-run       # the same checks on a tiny model on the CPU, few steps (CI)
    python benchmarks/gpu_check.py --model tiny    # the GPU checks on the tiny model (no model file needed)

Checks, each a short LWFTrainer run that must end with real ascent steps, a finite fp32 F and finite weights:
``bf16`` (16-bit weights, F fp32, theta_ref bf16), ``lora_gc`` (PEFT LoRA + gradient checkpointing, bf16 mixed
precision), ``resume`` (a run stopped after a checkpoint and resumed ends at the uninterrupted run's weights, with
the state on the parameters' device), ``fsdp`` (FSDP2 through accelerate on one GPU, under torchrun; skipped in
the dry run: accelerate builds FSDP only on GPUs), ``zero3`` (DeepSpeed ZeRO-3 on one GPU through the Trainer's
``deepspeed`` argument, bf16, with the default preconditioned ascent, under a one-rank torchrun; in the dry run the
same on the CPU in fp32 with DeepSpeed's CPU accelerator, and skipped when DeepSpeed is not installed).
``--step fsdp-worker`` and ``--step zero3-worker`` are what torchrun runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


class _Stop(Exception):
    """Raised by the crash callback: the run stops as if killed after its last checkpoint."""


def _model(dry: bool):
    import run as bench

    model, tokenizer = bench.load("tiny" if dry else os.environ.get("HF_LWF_GPU_CHECK_MODEL", "smollm2"))
    device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    return model.to(device, torch.bfloat16), tokenizer


def _trainer(model, tokenizer, out: str, dry: bool, callbacks=(), **overrides):
    import run as bench

    from hf_lwf import LWFTrainer
    from hf_lwf.app.tasks import forget_prompts

    steps, every = (4, 2) if dry else (8, 4)
    values = dict(lwf_max_new_tokens=8 if dry else 16, lwf_samples_per_prompt=1, lwf_unlearn_steps=2,
                  lwf_forget_loss_cap=50.0, per_device_train_batch_size=4, logging_steps=1, report_to=[],
                  save_strategy="no", use_cpu=dry or not torch.cuda.is_available(), bf16=False, seed=0,
                  data_seed=0, lwf_score_batch_size=4, lwf_generation_batch_size=8)
    values.update(overrides)
    data, args = bench.demo_data_and_args(tokenizer, steps, every, out, quick=True,
                                          lwf_forget_prompts=forget_prompts(2, "train"), **values)
    return LWFTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=bench.collator(tokenizer), callbacks=list(callbacks))


def _finished(trainer) -> dict:
    """What every check requires of a finished run; returns its counts."""
    state = trainer.lwf_callback.lwf_state
    assert state.unlearn_steps > 0, f"no ascent step was applied: {state.run_summary()}"
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in state.fisher.values()), "F not fp32/finite"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters()), "non-finite weights"
    assert all(x > -1e29 for x in state.scores), "a non-finite confidence"
    return state.run_summary()


def check_bf16(out: str, dry: bool) -> dict:
    model, tokenizer = _model(dry)
    trainer = _trainer(model, tokenizer, out, dry)
    trainer.train()
    result = _finished(trainer)
    assert all(r.dtype == torch.bfloat16 for r in trainer.lwf_callback.lwf_state.reference.values())
    return result


def check_lora_gc(out: str, dry: bool) -> dict:
    import peft

    model, tokenizer = _model(dry)
    model = peft.get_peft_model(model.float(), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainer = _trainer(model, tokenizer, out, dry, gradient_checkpointing=True, bf16=True)
    trainer.train()
    return _finished(trainer)


def check_resume(out: str, dry: bool) -> dict:
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Stop()

    def run(folder, callbacks=(), resume=None):
        torch.manual_seed(0)
        model, tokenizer = _model(dry)
        trainer = _trainer(model, tokenizer, os.path.join(out, folder), dry, callbacks=callbacks,
                           save_strategy="steps", save_steps=2)
        try:
            trainer.train(resume_from_checkpoint=resume)
        except _Stop:
            pass
        return trainer

    whole = run("whole")
    run("part", callbacks=[Crash()])
    resumed = run("part", resume=os.path.join(out, "part", "checkpoint-2"))
    result = _finished(resumed)
    state, params = resumed.lwf_callback.lwf_state, dict(resumed.model.named_parameters())
    assert all(state.fisher[n].device == params[n].device for n in state.fisher), "F not on the parameters' device"
    a = torch.cat([p.detach().float().reshape(-1) for p in whole.model.parameters()])
    b = torch.cat([p.detach().float().reshape(-1) for p in resumed.model.parameters()])
    difference = float((a - b).abs().max() / a.abs().max())
    assert difference < 1e-2, f"resumed weights differ from the uninterrupted run by {difference:.2e} (relative)"
    return {**result, "max_relative_weight_difference": difference}


def check_fsdp(out: str, dry: bool) -> dict:
    if dry or not torch.cuda.is_available():
        return {"skipped": "accelerate builds FSDP only on GPUs (the CPU FSDP2 tests are tests/test_fsdp.py)"}
    return _torchrun("fsdp-worker", out, dry)


def fsdp_worker(out: str) -> None:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    model, tokenizer = _model(False)
    trainer = _trainer(model.float(), tokenizer, out, False, bf16=True, fsdp="full_shard auto_wrap",
                       fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    trainer.train()
    result = _finished(trainer)
    with open(os.path.join(out, "fsdp-worker.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)


def _torchrun(step: str, out: str, dry: bool, env: dict | None = None) -> dict:
    """Run ``--step <step>`` on one rank under torchrun and return the JSON it wrote to ``<out>/<step>.json``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               os.path.abspath(__file__), "--step", step, "--out", out] + (["--dry-run"] if dry else [])
    # the dry run may JIT-build DeepSpeed's CPU communication op first (about a minute, cached afterwards)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240 if dry else 120,
                               env={**os.environ, **(env or {})})
    if completed.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
    with open(os.path.join(out, f"{step}.json"), encoding="utf-8") as handle:
        return json.load(handle)


def check_zero3(out: str, dry: bool) -> dict:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"skipped": "DeepSpeed is not installed (pip install hf_lwf[deepspeed])"}
    return _torchrun("zero3-worker", out, dry, env={"DS_ACCELERATOR": "cpu"} if dry else None)


def zero3_worker(out: str, dry: bool) -> None:
    """LWFTrainer under DeepSpeed ZeRO-3 on one rank: real ascent steps, F and theta_ref kept per slice, theta_ref
    in the weights' dtype, finite weights."""
    from deepspeed.utils import safe_get_full_fp32_param

    from hf_lwf.method.fisher import trainable_parameters

    if not dry:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    model, tokenizer = _model(dry)
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    trainer = _trainer(model.float(), tokenizer, out, dry, bf16=not dry, deepspeed=config)
    trainer.train()
    state = trainer.lwf_callback.lwf_state
    params = trainable_parameters(trainer.model)
    assert trainer.lwf_run.backend.name == "zero3" and all(hasattr(p, "ds_id") for p in params.values())
    assert state.unlearn_steps > 0, f"no ascent step was applied: {state.run_summary()}"
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in state.fisher.values()), "F not fp32"
    assert all(state.reference[n].dtype == p.ds_tensor.dtype for n, p in params.items()), "theta_ref not exact"
    assert sum(f.numel() for f in state.fisher.values()) == sum(p.ds_numel for p in params.values())
    assert all(torch.isfinite(safe_get_full_fp32_param(p)).all() for p in params.values()), "non-finite weights"
    result = {**state.run_summary(), "weights": str(next(iter(params.values())).ds_tensor.dtype)}
    with open(os.path.join(out, "zero3-worker.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)


CHECKS = {"bf16": check_bf16, "lora_gc": check_lora_gc, "resume": check_resume, "fsdp": check_fsdp,
          "zero3": check_zero3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="Tiny model on the CPU, few steps (what CI runs).")
    parser.add_argument("--checks", default=",".join(CHECKS), help="Comma-separated subset of " + ", ".join(CHECKS))
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="Working folder (default: a temporary one).")
    parser.add_argument("--summary", default=None, help="Also write the results as JSON to this file.")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default=None,
                        help="Model of the GPU checks (default smollm2; tiny needs no model file; the dry run always "
                             "uses tiny).")
    args = parser.parse_args(argv)
    if args.model:
        os.environ["HF_LWF_GPU_CHECK_MODEL"] = args.model  # the torchrun workers inherit it
    dry = args.dry_run or os.environ.get("HF_LWF_GPU_CHECK_DRY_RUN") == "1"
    torch.set_num_threads(1 if dry else torch.get_num_threads())
    if args.step == "fsdp-worker":
        fsdp_worker(args.out)
        return 0
    if args.step == "zero3-worker":
        zero3_worker(args.out, dry)
        return 0
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run with --dry-run for the CPU version.", file=sys.stderr)
        return 2
    results, failed = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.checks.split(","):
            start = time.perf_counter()
            folder = os.path.join(args.out or scratch, name)
            os.makedirs(folder, exist_ok=True)
            try:
                results[name] = {**CHECKS[name](folder, dry), "seconds": round(time.perf_counter() - start, 1)}
                print(f"[gpu_check] {name}: ok {results[name]}", flush=True)
            except Exception as err:  # noqa: BLE001 - every check runs; the failures are listed at the end
                failed.append(name)
                results[name] = {"error": f"{type(err).__name__}: {err}"}
                print(f"[gpu_check] {name}: FAILED {results[name]['error']}", flush=True)
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as handle:
            json.dump({"dry_run": dry, "results": results}, handle, indent=2, sort_keys=True)
    print("[gpu_check] " + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
