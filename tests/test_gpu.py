"""On a CUDA GPU (marked ``gpu``: skipped without one; benchmarks/gpu_check.sh runs them): LWFTrainer in bf16 and
fp16 with LoRA and gradient checkpointing, the online Fisher without host sync, an exact resume with the state on
the GPU, a model split over two GPUs, and 2-GPU NCCL DDP / FSDP2 runs (skipped with fewer than two GPUs)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import learning_dataset, lm_collator, lwf_args, tiny_llama

from hf_lwf import LWFTrainer
from hf_lwf.method.fisher import online_fisher_update_, trainable_parameters, zeros_like_parameters


pytestmark = pytest.mark.gpu
SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "gpu_multi.py")
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two CUDA GPUs")


def _gpu_args(path, **overrides):
    return lwf_args(path, use_cpu=False, **overrides)


def _trainer(tokenizer, args, model=None):
    model = model if model is not None else tiny_llama(len(tokenizer))
    return LWFTrainer(model=model, args=args, train_dataset=learning_dataset(tokenizer), processing_class=tokenizer,
                      data_collator=lm_collator(tokenizer))


def _flat(model):
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_lwf_trainer_with_lora_and_checkpointing_in_16_bit(tokenizer, tmp_path, precision):
    import peft

    model = peft.get_peft_model(tiny_llama(len(tokenizer)), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = _gpu_args(tmp_path, gradient_checkpointing=True, **{precision: True})
    trainer = _trainer(tokenizer, args, model)
    before = _flat(model)
    trainer.train()
    state = trainer.lwf_callback.lwf_state
    assert state.unlearn_points == 3 and state.unlearn_steps > 0
    assert all(f.dtype == torch.float32 and f.is_cuda and torch.isfinite(f).all() for f in state.fisher.values())
    assert set(state.fisher) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(torch.tensor(state.scores)))
    after = _flat(trainer.model)
    assert torch.isfinite(after).all() and not torch.equal(after.cpu(), before.cpu())


def test_bf16_weights_end_to_end_on_the_gpu(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer)).to("cuda", torch.bfloat16)
    trainer = _trainer(tokenizer, _gpu_args(tmp_path), model)
    trainer.train()
    state = trainer.lwf_callback.lwf_state
    assert state.unlearn_steps > 0 and state.fisher_updates == 6
    assert all(r.dtype == torch.bfloat16 and r.is_cuda for r in state.reference.values())
    assert all(f.dtype == torch.float32 for f in state.fisher.values())


def test_state_on_the_host_is_pinned_and_gives_the_same_run(tokenizer, tmp_path):
    def run(device):
        torch.manual_seed(0)
        trainer = _trainer(tokenizer, _gpu_args(tmp_path / device, bf16=True, lwf_state_device=device))
        trainer.train()
        return trainer

    on_gpu, on_host = run("auto"), run("cpu")
    state = on_host.lwf_callback.lwf_state
    assert all(f.device.type == "cpu" and f.is_pinned() for f in state.fisher.values())
    assert all(r.device.type == "cpu" and r.is_pinned() for r in state.reference.values())
    assert state.forget_indices == on_gpu.lwf_callback.lwf_state.forget_indices
    torch.testing.assert_close(_flat(on_host.model), _flat(on_gpu.model), rtol=1e-3, atol=1e-4)


def test_online_fisher_update_does_not_sync_with_the_host():
    torch.manual_seed(0)
    params = {"w": torch.zeros(64, 32, device="cuda"), "b": torch.zeros(32, device="cuda"),
              "idle": torch.zeros(8, device="cuda")}
    fisher = zeros_like_parameters(params)
    grads = {"w": torch.randn(64, 32, device="cuda", dtype=torch.bfloat16),
             "b": torch.randn(32, device="cuda", dtype=torch.bfloat16), "idle": None}
    coefficient = torch.tensor(0.5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        online_fisher_update_(fisher, grads, 0.95)
        online_fisher_update_(fisher, grads, 0.95, grad_scale=coefficient)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = 0.95 * 0.05 * grads["w"].float() ** 2 + 0.05 * (grads["w"].float() / 0.5) ** 2
    torch.testing.assert_close(fisher["w"], expected, rtol=1e-5, atol=0)
    assert float(fisher["idle"].abs().sum()) == 0.0


class _Stop(Exception):
    pass


def test_resume_on_cuda_continues_the_run_with_the_state_on_the_parameters_device(tokenizer, tmp_path):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):  # the run dies after checkpoint-4
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise _Stop()

    def run(path, resume=None, crash=False):
        torch.manual_seed(0)
        args = _gpu_args(path, save_strategy="steps", save_steps=2, bf16=True)
        trainer = _trainer(tokenizer, args)
        if crash:
            trainer.add_callback(Crash())
        try:
            trainer.train(resume_from_checkpoint=resume)
        except _Stop:
            pass
        return trainer

    whole = run(tmp_path / "whole")
    run(tmp_path / "part", crash=True)
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-4"))
    state = resumed.lwf_callback.lwf_state
    params = trainable_parameters(resumed.model)
    assert all(state.fisher[n].device == params[n].device for n in params)
    assert all(state.reference[n].device == params[n].device for n in params)
    assert state.unlearn_points == whole.lwf_callback.lwf_state.unlearn_points == 3
    assert state.forget_indices == whole.lwf_callback.lwf_state.forget_indices
    torch.testing.assert_close(_flat(resumed.model), _flat(whole.model), rtol=1e-3, atol=1e-4)  # GPU atomics


@two_gpus
def test_a_model_split_over_two_gpus_trains_with_lwf(tokenizer, tmp_path):
    from accelerate import dispatch_model

    model = tiny_llama(len(tokenizer))
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1}
    model = dispatch_model(model, device_map=device_map)
    trainer = _trainer(tokenizer, _gpu_args(tmp_path, lwf_mask_ratio=0.5), model)
    trainer.train()
    state = trainer.lwf_callback.lwf_state
    assert state.unlearn_steps > 0 and all(torch.isfinite(torch.tensor(state.scores)))
    params = trainable_parameters(trainer.model)
    assert {p.device.index for p in params.values()} == {0, 1}
    assert all(state.fisher[n].device == p.device for n, p in params.items())


def _torchrun(tmp_path, mode):
    out = tmp_path / mode
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, mode,
               str(out)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    if completed.returncode != 0:
        pytest.fail(f"torchrun {mode} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@two_gpus
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gpu_nccl_runs_keep_ranks_identical(tmp_path, mode):
    ranks = _torchrun(tmp_path, mode)
    assert ranks[0]["backend"] == "nccl" and ranks[0]["world_size"] == 2
    assert ranks[0]["unlearn_steps"] > 0
    assert ranks[0]["forget_indices"] == ranks[1]["forget_indices"]
    assert ranks[0]["scores"] == pytest.approx(ranks[1]["scores"], rel=1e-5)


@two_gpus
def test_two_gpu_fsdp2_with_cpu_offload_is_refused_with_a_message(tmp_path):
    ranks = _torchrun(tmp_path, "fsdp_offload")
    assert all("does not support FSDP2 with CPU offloading" in r["refused"] for r in ranks)


def test_bf16_scoring_on_the_gpu_uses_16_bit_contractions_and_matches_fp64(tokenizer):
    """bf16 weights on CUDA: the per-sample contractions take 16-bit operands with fp32 output (tensor cores), a(x)
    and n(x) of a block come from one compiled reduction, the output layer's loss runs over token chunks; the scores
    agree with plain per-sample autograd of the same weights in fp64 as closely as on the CPU."""
    import copy

    import hf_lwf.method.common as common
    import hf_lwf.method.persample.fused as fused
    from hf_lwf.method.common import batch_losses
    from hf_lwf.method.confidence import batch_confidence, reference_confidence
    from hf_lwf.method.fisher import ScoringTerms
    from hf_lwf.method.head import linear_head, response_losses
    from hf_lwf.method.selfgen import collate_self_data, encode_prompt
    from conftest import FORGET_PROMPTS

    assert common._native_f32_output(torch.device("cuda"))
    model = tiny_llama(len(tokenizer), seed=11).to("cuda", torch.bfloat16).eval()
    rows = [{"prompt_ids": encode_prompt(tokenizer, p), "response_ids": r}
            for p, r in zip(FORGET_PROMPTS, [[40, 41, 42, 1], [50, 51], [60, 61, 62, 63, 64, 65, 1], [70, 40, 40]])]
    batch = {k: v.cuda() for k, v in collate_self_data(rows, tokenizer.pad_token_id).items()}
    assert linear_head(model, batch) is model.lm_head
    torch.testing.assert_close(response_losses(model, batch), batch_losses(model, batch).float(), rtol=2e-2, atol=2e-2)
    g = torch.Generator().manual_seed(5)
    params = trainable_parameters(model)
    direction = {k: torch.randn(p.shape, generator=g).cuda() for k, p in params.items()}
    curvature = {k: torch.rand(p.shape, generator=g).cuda() for k, p in params.items()}
    a, n = batch_confidence(model, batch, ScoringTerms.explicit(direction, curvature))
    assert fused._FUSED.get("fn") not in (None, False)  # the compiled reduction ran
    a_only, _ = batch_confidence(model, batch, ScoringTerms.explicit(direction, curvature), norms=False)
    wide = copy.deepcopy(model).cpu().double()
    cpu_batch = {k: v.cpu() for k, v in batch.items()}
    direction = {k: v.cpu().double() for k, v in direction.items()}
    curvature = {k: v.cpu().double() for k, v in curvature.items()}
    a_ref = reference_confidence(wide, cpu_batch, direction, curvature, 1.0, "alignment")
    n_ref = (reference_confidence(wide, cpu_batch, direction, curvature, 1.0, "deviation") - a_ref) * 2

    def error(x, ref):
        return float((x.cpu().double() - ref).abs().max() / ref.abs().max())

    assert error(a, a_ref) <= 1.5e-2 and error(a_only, a_ref) <= 1.5e-2 and error(n, n_ref) <= 4e-3
