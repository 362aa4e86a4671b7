"""Run by tests/test_deepspeed.py under torchrun (2 CPU ranks, gloo): ``LWFTrainer`` under DeepSpeed ZeRO.

Phases: ``ddp`` (the same run under DDP, the reference), ``zero<S>`` (6 steps under ZeRO stage S, checkpoints every
2 steps), ``zero<S>-crash`` (stops at step 5, after checkpoint-4), ``zero<S>-resume`` (continues from the last
checkpoint); ``ddpemp`` and ``zero<S>emp`` are the DDP and ZeRO runs with the empirical Fisher. Several phases can run in one torchrun, comma-separated, when they share the engine kind (the DDP
reference cannot share a process with DeepSpeed: accelerate's state is a per-process singleton). Each rank
writes ``<phase>-rank<r>.json``.
"""

import json
import os
import re
import sys

import torch
import torch.distributed as dist
from transformers import TrainerCallback


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import build_tokenizer, learning_dataset, lm_collator, lwf_args, run_rank, tiny_llama  # noqa: E402

from hf_lwf import LWFTrainer  # noqa: E402
from hf_lwf.method.fisher import trainable_parameters  # noqa: E402


class Crash(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt  # not an Exception: nothing in the Trainer or LWF catches it


# every parameter partitioned (the default threshold keeps a tiny model's parameters whole on every rank)
ZERO3 = {"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True}


def deepspeed_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage, **(ZERO3 if stage == 3 else {})},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def whole_parameters(trainer, stage: int) -> list[torch.Tensor]:
    model = trainer.model
    params = sorted(trainable_parameters(model).items())
    if stage == 3:  # the fp32 master copy, all-gathered (the weights equal it in an fp32 run)
        from deepspeed.utils import safe_get_full_fp32_param

        return [safe_get_full_fp32_param(p).detach().clone() for _, p in params]
    return [p.detach().clone() for _, p in params]


def whole_fisher(callback, trainer, stage: int) -> dict[str, float]:
    fisher = callback.lwf_state.fisher
    if stage == 3:  # this rank's slices only: gather them to compare with the DDP run
        from hf_lwf.backends.zero import gather_partitions

        fisher = gather_partitions(fisher, trainable_parameters(trainer.model))
    return {n: float(f.double().abs().sum()) for n, f in sorted(fisher.items())}


def run(output_dir: str, phase: str) -> None:
    tokenizer = build_tokenizer()
    kind = phase.split("-")[0]
    engine, variant = re.fullmatch(r"(ddp|zero\d)(emp|pre)?", kind).groups()
    stage = int(engine[4:]) if engine.startswith("zero") else None
    extra = {} if stage is None else {"deepspeed": deepspeed_config(stage)}
    if variant == "emp":  # F from per-sample gradients of learning examples at each scoring point
        extra.update(lwf_fisher="empirical", lwf_fisher_samples=4)
    ascent = dict(lwf_unlearn_optimizer="sgd", lwf_unlearn_lr=0.05)
    if variant == "pre":  # the default ascent, preconditioned by the learning optimizer's second moment
        ascent = dict(lwf_unlearn_optimizer="preconditioned", lwf_unlearn_coef=0.5)
    folder = os.path.join(output_dir, phase if "-" not in phase else f"{kind}-split")
    args = lwf_args(folder, max_steps=6, per_device_train_batch_size=2, lwf_unlearn_every=2, lwf_forget_ratio=0.5,
                    lwf_unlearn_batch_size=2, lwf_mask_ratio=0.5, lwf_forget_loss_cap=50.0, save_strategy="steps",
                    save_steps=2, ddp_find_unused_parameters=False, **ascent, **extra)
    trainer = LWFTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=learning_dataset(tokenizer),
                         processing_class=tokenizer, data_collator=lm_collator(tokenizer),
                         callbacks=[Crash()] if phase.endswith("crash") else None)
    moved = []
    unlearn = trainer.lwf_run.unlearn
    optimizer_touched = []

    def measured_unlearn(model, optimizer, steps, max_grad_norm):  # how far the ascent steps moved the whole weights
        before = whole_parameters(trainer, stage)
        client = trainer.lwf_run.backend.learning_optimizer(optimizer)  # the torch optimizer (inside ZeRO's)
        state = {(id(p), k): v.clone() for p, s in client.state.items() for k, v in s.items() if torch.is_tensor(v)}
        applied = unlearn(model, optimizer, steps, max_grad_norm)
        moved.append(float(sum((a - b).double().abs().sum() for a, b in zip(whole_parameters(trainer, stage), before))))
        after = {(id(p), k): v for p, s in client.state.items() for k, v in s.items() if torch.is_tensor(v)}
        optimizer_touched.append(state.keys() != after.keys() or any(not torch.equal(v, after[k])
                                                                     for k, v in state.items()))
        return applied

    trainer.lwf_run.unlearn = measured_unlearn
    try:
        trainer.train(resume_from_checkpoint=True if phase.endswith("resume") else None)
    except KeyboardInterrupt:
        return
    callback = trainer.lwf_callback
    state = callback.lwf_state
    params = whole_parameters(trainer, stage)
    result = {
        "deepspeed": trainer.is_deepspeed_enabled,
        "stage": stage,
        "engine_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if stage else None,
        "lwf_stage": getattr(callback.run.backend, "stage", None),
        "weights": [float(p.double().abs().sum()) for p in params],
        "ascent_moved": moved,
        "optimizer_touched": optimizer_touched,
        "checksum": float(sum(p.double().sum() for p in params)),
        "self_data": [list(r) for r in callback.self_data["response_ids"]],
        "scores": state.scores,
        "forget_indices": state.forget_indices,
        "unlearn_steps": state.unlearn_steps,
        "fisher_updates": state.fisher_updates,
        "fisher": whole_fisher(callback, trainer, stage),
        "state_numel": sum(t.numel() for t in list(state.fisher.values()) + list(state.reference.values())),
        "history": [{k: v for k, v in h.items() if "seconds" not in k} for h in state.history],
        "checkpoints": sorted(d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-")),
    }
    with open(os.path.join(output_dir, f"{phase}-rank{dist.get_rank()}.json"), "w") as handle:
        json.dump(result, handle)


def main(output_dir: str, names: str) -> None:
    for name in names.split(","):
        run(output_dir, name)


if __name__ == "__main__":
    run_rank(main, sys.argv[1], sys.argv[2])
