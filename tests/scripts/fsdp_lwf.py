"""Run by tests/test_fsdp.py under torchrun (2 CPU ranks, gloo): LWF on an FSDP2 (``fully_shard``) tiny model.

Models: a tiny Llama, a tiny GPT-2 (tied embeddings, Conv1D) and the Llama with PEFT LoRA adapters. Every piece
is computed twice in the same process, on the sharded model and on an unsharded copy with the same weights and data, and rank ``r`` writes the comparisons to ``rank{r}.json``:

* the pieces: D_self, the online Fisher and theta_ref (as ``DTensor`` shards), the mask threshold, the confidence
  scores of both modes, the empirical Fisher, an ascent step, and the state saved whole and read back per shard;
* the callback wired as ``LWFTrainer`` wires it (Fisher before clipping, the state saved on every rank), driven
  through the Trainer's event order: 6 steps with unlearning points at 2, 4 and 6, sharded against unsharded, and
  a sharded run interrupted after step 4 whose LWF state is restored from ``checkpoint-4`` by a new callback;
* the same callback run under FSDP2 bf16 mixed precision (``MixedPrecisionPolicy``, fp32 gradient reduction).
"""

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from transformers import TrainerControl, TrainerState


# the repository's own hf_lwf first (a script's sys.path starts at its folder, not the working directory, so an
# installed hf_lwf elsewhere would be tested instead), then tests/ for conftest
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import (  # noqa: E402
    FORGET_PROMPTS, build_tokenizer, learning_dataset, lm_collator, run_rank, tiny_gpt2, tiny_llama,
)

from hf_lwf.backends import detect_backend  # noqa: E402
from hf_lwf import LWFCallback, LWFConfig  # noqa: E402
from hf_lwf.method.confidence import score_self_data  # noqa: E402
from hf_lwf.distributed import local_rows, local_view  # noqa: E402
from hf_lwf.method.fisher import ScoringTerms, empirical_fisher, online_fisher_update_, snapshot, trainable_parameters  # noqa: E402
from hf_lwf.method.selfgen import collate_self_data, generate_self_data  # noqa: E402
from hf_lwf.state import LWFState  # noqa: E402
from hf_lwf.method.unlearn import ascent_step  # noqa: E402


def lora_llama(vocab: int, seed: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        init_lora_weights=False)  # non-zero B: the adapters have gradients in every direction
    torch.manual_seed(seed + 1)
    return get_peft_model(tiny_llama(vocab, seed=seed), config)


ARCHS = {"llama": (tiny_llama, lambda m: m.model.layers), "gpt2": (tiny_gpt2, lambda m: m.transformer.h),
         "lora": (lora_llama, lambda m: m.base_model.model.model.layers)}


def build(arch: str, vocab: int, sharded: bool, bf16: bool = False):
    make, blocks = ARCHS[arch]
    model = make(vocab, seed=1)
    if sharded:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs = {"mp_policy": policy} if policy else {}
        for block in blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        register_fsdp_forward_method(model, "generate")  # as the Trainer does under FSDP2 (PEFT's generate needs it)
    return model


def shard_diff(sharded: dict, whole: dict) -> float:
    """Largest |difference| between each rank's shard and the same rows of the unsharded tensor."""
    worst = 0.0
    for name, tensor in sharded.items():
        rows = local_rows(tensor)
        expected = whole[name] if rows is None else whole[name][rows]
        got = local_view(tensor).float()
        if got.numel():
            worst = max(worst, float((got - expected.float()).abs().max()))
    return worst


def params_diff(sharded_model, plain_model) -> float:
    plain = {n: p.detach() for n, p in trainable_parameters(plain_model).items()}
    return shard_diff({n: p.detach() for n, p in trainable_parameters(sharded_model).items()}, plain)


def pieces(arch: str, output_dir: str, tokenizer, batch) -> dict:
    plain, sharded = build(arch, len(tokenizer), False), build(arch, len(tokenizer), True)
    out = {}
    prompts = {"geo": FORGET_PROMPTS[:3], "dental": FORGET_PROMPTS[3:]}
    self_data = [generate_self_data(m, tokenizer, prompts, samples_per_prompt=2, max_new_tokens=8, batch_size=3,
                                    seed=7, show_progress=False) for m in (plain, sharded)]
    out["self_data_equal"] = self_data[0]["response_ids"] == self_data[1]["response_ids"]
    out["self_data_size"] = len(self_data[0])
    rows = self_data[0]

    references = [snapshot(m) for m in (plain, sharded)]
    fishers = [{}, {}]
    for model, fisher in zip((plain, sharded), fishers):
        model.train()
        model(**batch).loss.backward()
        online_fisher_update_(fisher, {n: p.grad for n, p in trainable_parameters(model).items()}, 0.9)
        torch.optim.SGD(model.parameters(), lr=0.05).step()
        model.zero_grad(set_to_none=True)
    out["fisher_dtensor"] = all(isinstance(f, DTensor) for f in fishers[1].values()) and all(
        isinstance(r, DTensor) for r in references[1].values())
    out["fisher_local_numel"] = sum(local_view(f).numel() for f in fishers[1].values())
    out["fisher_numel"] = sum(f.numel() for f in fishers[0].values())
    out["fisher_diff"] = shard_diff(fishers[1], fishers[0])
    out["fisher_scale"] = max(float(f.abs().max()) for f in fishers[0].values())
    out["reference_diff"] = shard_diff(references[1], references[0])
    out["step_diff"] = params_diff(sharded, plain)

    for mode in ("deviation", "alignment"):
        terms, scores = [], []
        for model, fisher, reference in zip((plain, sharded), fishers, references):
            terms.append(ScoringTerms.from_state(fisher, model=model, reference=reference, scale=2.0, mask_ratio=0.3))
            scores.append(score_self_data(model, rows, tokenizer.pad_token_id, terms[-1], None, lr=0.05, mode=mode,
                                          batch_size=3, show_progress=False, chunk_elements=257).tolist())
        out[f"threshold_{mode}"] = [t.threshold for t in terms]
        out[f"scores_{mode}"] = scores

    examples = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    empirical = [empirical_fisher(m, examples, chunk_elements=257) for m in (plain, sharded)]
    out["empirical_diff"] = max(shard_diff(empirical[1][0], empirical[0][0]), shard_diff(empirical[1][1], empirical[0][1]))
    out["empirical_scale"] = max(float(f.abs().max()) for f in empirical[0][0].values())

    forget = collate_self_data([rows[i] for i in range(min(4, len(rows)))], tokenizer.pad_token_id)
    out["ascent"] = [ascent_step(m, forget, torch.optim.SGD(m.parameters(), lr=0.1), coef=1.0, loss_cap=100.0,
                                 max_grad_norm=1.0) for m in (plain, sharded)]
    out["ascent_diff"] = params_diff(sharded, plain)

    state = LWFState(fisher=fishers[1], reference=references[1])
    tensors = state.tensors_for_saving(keep=dist.get_rank() == 0)
    directory = os.path.join(output_dir, f"state-{arch}")
    if dist.get_rank() == 0:
        state.save(directory, tensors)
        whole = LWFState.load(directory)
        out["saved_whole_diff"] = max(float((whole.fisher[n] - fishers[0][n]).abs().max()) for n in fishers[0])
    dist.barrier()
    params = trainable_parameters(sharded)
    loaded = LWFState.load(directory, rows={n: local_rows(p) for n, p in params.items()})
    loaded.place_like(params)
    plain_callback = LWFCallback(LWFConfig(lwf_forget_prompts=FORGET_PROMPTS))  # not registered by LWFTrainer
    try:
        detect_backend(SimpleNamespace(), sharded).check(plain_callback.config, via_trainer=False, model=sharded)
        out["plain_callback_refused"] = ""
    except ValueError as err:
        out["plain_callback_refused"] = str(err)
    out["restored_exact"] = all(
        isinstance(loaded.fisher[n], DTensor) and torch.equal(local_view(loaded.fisher[n]), local_view(fishers[1][n]))
        and torch.equal(local_view(loaded.reference[n]), local_view(references[1][n]))
        for n in params
    )
    return out


def train(model, tokenizer, batches, output_dir, steps, *, start=0, resume_dir=None, save_at=(), optimizer=None):
    """The Trainer's event order around ``LWFCallback``, with LWFTrainer's wiring (Fisher before clipping, the
    state saved on every rank). Returns the callback and the optimizer (to continue a run)."""
    config = LWFConfig(lwf_forget_prompts=FORGET_PROMPTS, lwf_unlearn_every=2, lwf_forget_ratio=0.5,
                       lwf_unlearn_batch_size=3, lwf_unlearn_steps=2, lwf_max_new_tokens=8, lwf_samples_per_prompt=2,
                       lwf_generation_batch_size=3, lwf_mask_ratio=0.5, lwf_score_batch_size=3,
                       lwf_score_chunk_size=300, lwf_seed=3, lwf_forget_loss_cap=50.0)
    rank = dist.get_rank()
    args = SimpleNamespace(output_dir=output_dir, should_save=rank == 0, learning_rate=0.01, max_grad_norm=1.0,
                           disable_tqdm=True, process_index=rank, max_steps=steps)
    callback = LWFCallback(config)
    callback.via_trainer = True
    callback.resume_dir = resume_dir
    state, control = TrainerState(global_step=start, max_steps=steps), TrainerControl()
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=0.01)
    callback.on_init_end(args, state, control, model=model, processing_class=tokenizer)
    callback.on_train_begin(args, state, control, model=model, processing_class=tokenizer, optimizer=optimizer)
    params = list(model.parameters())
    while state.global_step < steps:
        model.train()
        model(**batches[state.global_step % len(batches)]).loss.backward()
        callback.run.update_fisher(model, state.global_step)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        callback.on_optimizer_step(args, state, control, model=model, optimizer=optimizer)
        optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        callback.on_step_end(args, state, control, model=model, optimizer=optimizer)
        if state.global_step in save_at:
            checkpoint = os.path.join(output_dir, f"checkpoint-{state.global_step}")
            if rank == 0:
                os.makedirs(checkpoint, exist_ok=True)
            dist.barrier()
            callback.run.save(checkpoint, state.global_step, should_save=args.should_save, model=model)
            dist.barrier()
    return callback, optimizer


def summary(callback) -> dict:
    lwf = callback.lwf_state
    return {"scores": lwf.scores, "forget_indices": lwf.forget_indices, "unlearn_steps": lwf.unlearn_steps,
            "unlearn_points": lwf.unlearn_points, "fisher_updates": lwf.fisher_updates,
            "forget_loss": [h.get("lwf/forget_loss") for h in lwf.history]}


def callback_runs(arch: str, output_dir: str, tokenizer, batches) -> dict:
    out = {}
    plain = build(arch, len(tokenizer), False)
    start = {n: p.detach().clone() for n, p in plain.named_parameters()}
    plain_cb, _ = train(plain, tokenizer, batches, os.path.join(output_dir, f"{arch}-plain"), 6)
    out["moved"] = max(float((p.detach() - start[n]).abs().max()) for n, p in plain.named_parameters())
    sharded = build(arch, len(tokenizer), True)
    sharded_cb, _ = train(sharded, tokenizer, batches, os.path.join(output_dir, f"{arch}-sharded"), 6)
    out["plain"], out["sharded"] = summary(plain_cb), summary(sharded_cb)
    out["final_diff"] = params_diff(sharded, plain)
    out["fisher_diff"] = shard_diff(sharded_cb.lwf_state.fisher, plain_cb.lwf_state.fisher)
    out["fisher_scale"] = max(float(f.abs().max()) for f in plain_cb.lwf_state.fisher.values())

    resumed_dir = os.path.join(output_dir, f"{arch}-resumed")
    model = build(arch, len(tokenizer), True)
    _, optimizer = train(model, tokenizer, batches, resumed_dir, 4, save_at=(4,))
    resumed_cb, _ = train(model, tokenizer, batches, resumed_dir, 6, start=4, optimizer=optimizer,
                          resume_dir=os.path.join(resumed_dir, "checkpoint-4"))
    out["resumed"] = summary(resumed_cb)

    mixed = build(arch, len(tokenizer), True, bf16=True)
    mixed_cb, _ = train(mixed, tokenizer, batches, os.path.join(output_dir, f"{arch}-bf16"), 6)
    fisher = mixed_cb.lwf_state.fisher
    out["bf16"] = summary(mixed_cb)
    out["bf16_state"] = {"dtensor_fp32": all(isinstance(f, DTensor) and f.dtype == torch.float32 for f in fisher.values()),
                         "fisher_scale": max(float(local_view(f).abs().max()) for f in fisher.values()
                                             if local_view(f).numel())}
    out["resumed_diff"] = max(  # against the uninterrupted sharded run, shard by shard
        float((local_view(a.detach()) - local_view(b.detach())).abs().max())
        for a, b in zip(model.parameters(), sharded.parameters()) if local_view(a).numel()
    )
    return out


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    tokenizer = build_tokenizer()
    collate = lm_collator(tokenizer)
    dataset = learning_dataset(tokenizer, n=16)
    batches = [collate([dataset[i] for i in range(j, j + 4)]) for j in range(0, 16, 4)]
    result = {"world_size": dist.get_world_size()}
    for arch in ARCHS:
        result[arch] = {"pieces": pieces(arch, output_dir, tokenizer, batches[0]),
                        "callback": callback_runs(arch, output_dir, tokenizer, batches)}
    with open(os.path.join(output_dir, f"rank{dist.get_rank()}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    run_rank(main, sys.argv[1])
