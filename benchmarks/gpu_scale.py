"""LWF at the scale users train: Llama-3.2-1B and Llama-3-8B shapes on one GPU, built from configs (no download).

    python benchmarks/gpu_scale.py                    # one GPU: llama-1b (full, bf16, AdamW), llama-8b-lora (r 16)
    python benchmarks/gpu_scale.py --models llama-1b,llama-8b-lora,llama-8b-full   # + 8B full, state on the host
    python benchmarks/gpu_scale.py --dry-run          # tiny shapes on the CPU, about a minute (CI)

Every model gets random weights from its config, learning batches of 8 x 512 tokens and one process. Per model it
records, under ``scale`` in ``benchmarks/results/<machine>.json`` (``--out`` writes elsewhere):

* ``trainable_parameters``;
* ``step``: a vanilla training step (forward, backward, clipping, AdamW) against the same step with the online
  Fisher update, interleaved on one model and optimizer (``overhead``); and two ``Trainer`` runs, vanilla then
  ``LWFTrainer`` with one unlearning point (``trainer_overhead``: median step time of the steps without a point);
* ``scoring``: ``deviation`` and ``alignment`` scoring of 8 x 512-token D_self batches and the empirical Fisher of
  learning batches, each over a batched forward+backward of the same batches (medians of interleaved repeats);
* ``generation``: self-generation tokens/s through ``generate_self_data``;
* ``memory``: peak device memory of the vanilla and the LWF ``Trainer`` runs (``peak_*``), what LWF added, and
  the memory model's prediction for the same run (:func:`hf_lwf.memory.predict_added_bytes`);
* ``profile`` (``--profile``): the heaviest kernels of one ``deviation`` batch and of one forward+backward, and
  the host-side time against the device time of each.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


SHAPES = {
    # Llama-3.2-1B: hidden 2048, 16 layers, vocabulary 128,256, tied embeddings
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-3-8B
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
}
MODELS = {  # shape, trainable, LWF options
    "llama-1b": dict(shape="llama-1b", lora=None, lwf={}),
    "llama-8b-lora": dict(shape="llama-8b", lora=16, lwf={}),
    "llama-8b-full": dict(shape="llama-8b", lora=None, lwf={"lwf_state_device": "cpu"}),
}
WORKLOAD = dict(batch=8, tokens=512, steps=14, every=12, repeats=5, score_repeats=3, prompts=16, new_tokens=64,
                gen_prompts=64, gen_tokens=128)
DRY_WORKLOAD = dict(batch=2, tokens=32, steps=6, every=4, repeats=2, score_repeats=1, prompts=4, new_tokens=8,
                    gen_prompts=4, gen_tokens=8)


# ------------------------------------------------------------------------------------------------ building
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tokenizer_for(vocab_size: int):
    """A word-level tokenizer over ``vocab_size`` made-up words, with a chat template (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    wrapped.chat_template = ("{% for m in messages %}{{ m['content'] }} <eos> {% endfor %}"
                             "{% if add_generation_prompt %}w3{% endif %}")
    return wrapped


def build(name: str, dry: bool):
    """``(model, tokenizer)``: random weights from the shape's config, bf16 on the GPU (fp32 on the CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = MODELS[name]
    shape = SHAPES["tiny" if dry else spec["shape"]]
    config = LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                         attn_implementation="sdpa")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy of an 8B model first
    try:
        with torch.device(device()):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if spec["lora"]:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=spec["lora"], lora_alpha=2 * spec["lora"],
                                                           target_modules=["q_proj", "v_proj"]))
    return model, tokenizer_for(shape["vocab_size"])


def learning_rows(vocab: int, w: dict, count: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (w["tokens"],), generator=g).tolist()} for _ in range(count)]


def forget_prompts(vocab: int, count: int, seed: int = 1) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(t)}" for t in torch.randint(3, vocab, (int(n),), generator=g))
            for n in torch.randint(16, 48, (count,), generator=g)]


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ sections
def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns in every repeat (after one warm-up each)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_step(model, w: dict, state_device: str | None = None) -> dict:
    """A vanilla step against the same step plus the online Fisher update, on one model and optimizer (F on
    ``state_device``: ``None`` next to each parameter, ``"cpu"`` on the host)."""
    from hf_lwf.method.common import batch_losses
    from hf_lwf.method.fisher import online_fisher_update_, trainable_parameters

    model.train()
    params = trainable_parameters(model)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (w["batch"], w["tokens"]), device=device())
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-7, fused=torch.cuda.is_available())
    fisher: dict = {}
    factor = [1.0]  # the run's fp32 F is held with a factor: one pass per step

    def update():
        factor[0] = online_fisher_update_(fisher, {n: p.grad for n, p in params.items()}, 0.95, device=state_device,
                                          factor=factor[0])

    def step(with_update: bool):
        optimizer.zero_grad(set_to_none=True)
        batch_losses(model, batch).mean().backward()
        if with_update:
            update()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()

    def update_only():
        update()

    t = interleaved({"vanilla_step": lambda: step(False), "lwf_step": lambda: step(True),
                     "fisher_update": update_only}, w["repeats"])
    optimizer.zero_grad(set_to_none=True)
    del optimizer, fisher
    free()
    return {"seconds": t, "overhead": t["lwf_step"] / t["vanilla_step"] - 1,
            "update_over_step": t["fisher_update"] / t["vanilla_step"],
            "batch": f"{w['batch']} x {w['tokens']} tokens"}


def fake_state(params: dict, seed: int = 0) -> tuple[dict, dict]:
    """F and theta_ref as an LWF run would hold them (fp32 F, theta_ref in the weights' dtype), on the device."""
    g = torch.Generator(device=device()).manual_seed(seed)
    fisher, reference = {}, {}
    for n, p in params.items():
        fisher[n] = torch.rand(p.shape, generator=g, device=p.device) * 1e-3
        step = torch.randn(p.shape, generator=g, device=p.device) * 1e-4
        reference[n] = (p.detach().float() - step).to(p.dtype)
    return fisher, reference


def self_batches(vocab: int, w: dict, count: int) -> list[dict]:
    """D_self-like batches of ``w['tokens']`` tokens, half prompt (label -100), half response."""
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (w["batch"], w["tokens"]), generator=g).to(device())
        labels = ids.clone()
        labels[:, : w["tokens"] // 2] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def bench_scoring(model, w: dict) -> dict:
    from hf_lwf.method.common import batch_losses
    from hf_lwf.method.confidence import batch_confidence
    from hf_lwf.method.fisher import ScoringTerms, empirical_fisher, trainable_parameters

    model.eval()
    params = trainable_parameters(model)
    batches = self_batches(model.config.vocab_size, w, 2)
    fisher, reference = fake_state(params)
    terms = ScoringTerms.from_state(fisher, model=model, reference=reference)

    def forward_backward(labelled="response"):
        for b in batches:
            labels = b["input_ids"] if labelled == "all" else b["labels"]
            batch_losses(model, {**b, "labels": labels}).sum().backward()
        model.zero_grad(set_to_none=True)

    examples = [{"input_ids": b["input_ids"][i : i + 1], "attention_mask": b["attention_mask"][i : i + 1],
                 "labels": b["input_ids"][i : i + 1]} for b in batches for i in range(b["input_ids"].shape[0])]
    fns = {
        "forward_backward": forward_backward,
        "deviation": lambda: [batch_confidence(model, b, terms, norms=True) for b in batches],
        "alignment": lambda: [batch_confidence(model, b, terms, norms=False) for b in batches],
        "lm_forward_backward": lambda: forward_backward("all"),
        "empirical_fisher": lambda: empirical_fisher(model, examples, batch_size=w["batch"], with_mean=False),
    }
    t = interleaved(fns, w["score_repeats"])
    fb = t["forward_backward"]
    out = {"workload": f"{len(batches)} batches of {w['batch']} x {w['tokens']} tokens",
           "seconds": {k: round(v, 5) for k, v in t.items()},
           "deviation_over_forward_backward": t["deviation"] / fb,
           "alignment_over_forward_backward": t["alignment"] / fb,
           "empirical_fisher_over_forward_backward": t["empirical_fisher"] / t["lm_forward_backward"]}
    del fisher, reference, terms
    free()
    return out


def bench_generation(model, tokenizer, w: dict) -> dict:
    """Tokens/s of self-generation (``generate_self_data``: batched, length-sorted, sampling, KV cache)."""
    from hf_lwf.method.selfgen import generate_self_data

    prompts = {"random": forget_prompts(model.config.vocab_size, w["gen_prompts"])}
    def run():
        return generate_self_data(model, tokenizer, prompts, samples_per_prompt=1, max_new_tokens=w["gen_tokens"],
                                  batch_size=w["gen_prompts"], seed=0, show_progress=False)

    run()  # warm-up
    sync()
    start = time.perf_counter()
    data = run()
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(r) for r in data["response_ids"])
    return {"prompts": w["gen_prompts"], "batch": w["gen_prompts"], "max_new_tokens": w["gen_tokens"],
            "new_tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


class StepTimer:
    """Per-step wall time (device synchronised) and per-step peak device memory of a Trainer run."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times, self.peaks, self.between, self.start = {}, {}, {}, None

            def on_step_begin(self, args, state, control, **kwargs):
                sync()
                if torch.cuda.is_available():  # the peak since the last step: generation, an unlearning point
                    self.between[state.global_step] = torch.cuda.max_memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()

            def on_train_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    self.between[state.global_step + 1] = torch.cuda.max_memory_allocated()

            def on_step_end(self, args, state, control, **kwargs):
                sync()
                self.times[state.global_step] = time.perf_counter() - self.start
                if torch.cuda.is_available():
                    self.peaks[state.global_step] = torch.cuda.max_memory_allocated()

        return _Timer()


def trainer_run(name: str, kind: str, w: dict, dry: bool, out: str) -> dict:
    """One Trainer run from a fresh model: step times, peak device memory, and (LWF) what LWF held."""
    from transformers import Trainer, TrainingArguments

    from hf_lwf import LWFTrainer, LWFTrainingArguments
    from hf_lwf.app.learning_data import LearningCollator
    from hf_lwf.method.fisher import trainable_parameters

    free()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    model, tokenizer = build(name, dry)
    weights = torch.cuda.memory_allocated() - before if torch.cuda.is_available() else 0
    data = learning_rows(model.config.vocab_size, w, w["batch"] * w["steps"])
    common = dict(output_dir=out, max_steps=w["steps"], per_device_train_batch_size=w["batch"], learning_rate=1e-5,
                  logging_steps=w["steps"], save_strategy="no", report_to=[], disable_tqdm=True,
                  bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), seed=0,
                  optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch", dataloader_num_workers=0)
    timer = StepTimer()
    if kind == "vanilla":
        args, cls = TrainingArguments(**common), Trainer
    else:
        lwf = dict(lwf_forget_prompts={"random": forget_prompts(model.config.vocab_size, w["prompts"])},
                   lwf_unlearn_every=w["every"], lwf_max_new_tokens=w["new_tokens"], lwf_forget_loss_cap=1e4)
        lwf.update(MODELS[name]["lwf"])
        args, cls = LWFTrainingArguments(**common, **lwf), LWFTrainer
    trainer = cls(model=model, args=args, train_dataset=data, data_collator=LearningCollator(0),
                  processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    steps = [s for s in timer.times if s > 3 and s % w["every"]]
    result = {"median_step_seconds": statistics.median(timer.times[s] for s in steps),
              "peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
              "weights_bytes": weights,
              "trainable_parameters": sum(p.numel() for p in trainable_parameters(model).values()),
              "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable_parameters(model).values())}
    if timer.peaks:
        result["step_peak_bytes"] = max(timer.peaks[s] for s in steps)
        result["peak_bytes"] = max(list(timer.peaks.values()) + list(timer.between.values()))
        result["before_first_step_peak_bytes"] = timer.between.get(0)
    if kind == "lwf":
        run = trainer.lwf_callback
        state = run.lwf_state
        on_device = lambda group: sum(t.numel() * t.element_size() for t in group.values()  # noqa: E731
                                      if t.device.type != "cpu")
        result.update(point_peak_bytes=timer.between.get(w["every"]), fisher_bytes=on_device(state.fisher),
                      reference_bytes=on_device(state.reference), summary=state.run_summary(),
                      self_data_tokens=sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in run.self_data),
                      self_data_rows=len(run.self_data),
                      longest_self_data_row=max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in run.self_data),
                      lwf_seconds={k: v for record in trainer.state.log_history for k, v in record.items()
                                   if k.endswith("_seconds") and k.startswith("lwf/")})
    del trainer, model
    free()
    return result


def bench_profile(model, w: dict) -> dict:
    """The heaviest kernels of one ``deviation`` batch and of one batched forward+backward, with host and device
    time of each (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    from hf_lwf.method.common import batch_losses
    from hf_lwf.method.confidence import batch_confidence
    from hf_lwf.method.fisher import ScoringTerms, trainable_parameters

    model.eval()
    params = trainable_parameters(model)
    batch = self_batches(model.config.vocab_size, w, 1)[0]
    fisher, reference = fake_state(params)
    terms = ScoringTerms.from_state(fisher, model=model, reference=reference)
    passes = {"deviation": lambda: batch_confidence(model, batch, terms, norms=True),
              "alignment": lambda: batch_confidence(model, batch, terms, norms=False),
              "forward_backward": lambda: (batch_losses(model, batch).sum().backward(),
                                           model.zero_grad(set_to_none=True))}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    out = {}
    for label, fn in passes.items():
        fn()
        sync()
        wall = time.perf_counter()
        with profile(activities=activities) as prof:
            fn()
            sync()
        wall = time.perf_counter() - wall
        events = prof.key_averages()
        key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:25]
        device_us = sum(getattr(e, "self_device_time_total", 0) for e in events) if torch.cuda.is_available() else None
        launches = sum(e.count for e in events if getattr(e, "self_device_time_total", 0) > 0) \
            if torch.cuda.is_available() else None
        out[label] = {"wall_seconds": wall, "device_seconds": device_us / 1e6 if device_us is not None else None,
                      "kernel_launches": launches,
                      "top": [{"name": e.key[:90], "count": e.count, "self_us": round(getattr(e, key, 0), 1),
                               "cpu_us": round(e.self_cpu_time_total, 1)} for e in top]}
    del fisher, reference, terms
    free()
    return out


# ------------------------------------------------------------------------------------------------ main
def measure(name: str, dry: bool, sections: list[str], out: str) -> dict:
    from hf_lwf.memory import predict_added_bytes

    w = DRY_WORKLOAD if dry else WORKLOAD
    result: dict = {"workload": w}
    model, tokenizer = build(name, dry)
    from hf_lwf.method.fisher import trainable_parameters

    result["trainable_parameters"] = sum(p.numel() for p in trainable_parameters(model).values())
    for section, fn in (("scoring", lambda: bench_scoring(model, w)), ("step", lambda: bench_step(model, w, MODELS[name]["lwf"].get("lwf_state_device"))),
                        ("generation", lambda: bench_generation(model, tokenizer, w)),
                        ("profile", lambda: bench_profile(model, w))):
        if section in sections:
            start = time.perf_counter()
            try:
                result[section] = fn()
            except Exception as err:  # noqa: BLE001 - record what ran, go on with the other sections
                result[section] = {"error": f"{type(err).__name__}: {err}"}
            print(f"[gpu_scale] {name} {section}: {time.perf_counter() - start:.1f} s "
                  f"{json.dumps(result[section])[:400]}", flush=True)
    config = model.config
    del model
    free()
    if "trainer" in sections:
        runs = {}
        for kind in ("vanilla", "lwf"):
            start = time.perf_counter()
            try:
                runs[kind] = trainer_run(name, kind, w, dry, os.path.join(out, f"{name}-{kind}"))
            except Exception as err:  # noqa: BLE001
                runs[kind] = {"error": f"{type(err).__name__}: {err}"}
            print(f"[gpu_scale] {name} trainer {kind}: {time.perf_counter() - start:.1f} s "
                  f"{json.dumps(runs[kind])[:600]}", flush=True)
        result["trainer"] = runs
        vanilla, lwf = runs.get("vanilla", {}), runs.get("lwf", {})
        if "median_step_seconds" in vanilla and "median_step_seconds" in lwf:
            result["trainer_overhead"] = lwf["median_step_seconds"] / vanilla["median_step_seconds"] - 1
        if vanilla.get("peak_bytes") and lwf.get("peak_bytes"):
            longest = lwf.get("longest_self_data_row", w["tokens"])
            predicted = predict_added_bytes(
                config, trainable=lwf["trainable_parameters"], weight_bytes=lwf["trainable_bytes"] // max(
                    1, lwf["trainable_parameters"]),
                learning_tokens=w["batch"] * w["tokens"], score_batch=8, score_tokens=longest,
                state_on_device=MODELS[name]["lwf"].get("lwf_state_device") != "cpu")
            added = lwf["peak_bytes"] - vanilla["peak_bytes"]
            result["memory"] = {"peak_vanilla_bytes": vanilla["peak_bytes"], "peak_lwf_bytes": lwf["peak_bytes"],
                                "added_bytes": added, "predicted_added_bytes": predicted["added"],
                                "prediction": predicted, "added_over_predicted": added / predicted["added"]
                                if predicted["added"] else None}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="Tiny shapes on the CPU (what CI runs).")
    parser.add_argument("--models", default="llama-1b,llama-8b-lora", help="Comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--sections", default="scoring,step,generation,trainer",
                        help="Comma-separated subset of scoring, step, generation, trainer, profile.")
    parser.add_argument("--profile", action="store_true", help="Also profile one scoring batch (adds `profile`).")
    parser.add_argument("--out", default=None, help="Results file (default benchmarks/results/<machine>.json).")
    parser.add_argument("--work", default=None, help="Working folder for the Trainer runs (default: temporary).")
    args = parser.parse_args(argv)
    import run as bench

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_scale: no CUDA GPU here; run with --dry-run for the CPU version.", file=sys.stderr)
        return 2
    if dry:
        torch.set_num_threads(1)
    info = bench.machine()
    path = args.out or os.path.join(HERE, "results", f"{bench.machine_slug(info)}.json")
    previous = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            previous = json.load(handle)
    sections = args.sections.split(",") + (["profile"] if args.profile else [])
    scale = {"machine": info, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": dry,
             "commit": os.environ.get("HF_LWF_COMMIT") or _commit(), "models": {}}
    result = {**previous, "scale": scale}
    result.setdefault("machine", info)
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            start = time.perf_counter()
            scale["models"][name] = measure(name, dry, sections, args.work or scratch)
            scale["models"][name]["seconds"] = round(time.perf_counter() - start, 1)
            with open(path, "w", encoding="utf-8") as handle:  # after every model: a cut-off run keeps what ran
                json.dump(result, handle, indent=2, sort_keys=True)
            print(f"[gpu_scale] {name} done in {scale['models'][name]['seconds']} s; wrote {path}", flush=True)
    return 0


def _commit() -> str | None:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    sys.exit(main())
