"""Config-driven, resumable experiment runner: fine-tune on a learning task with or without forgetting, score with lm-eval.

One run = (learning task, forgetting setting, method, seed); it writes one JSON file to ``--results_dir`` and is
skipped when that file exists, so a grid can be run in chunks (``--max_minutes``).

    # one cell, one seed
    python -m experiments.run --learn sst5 --forget dental --method vanilla lwf --seed 0 1 2
    # a grid from a config, resumable, at most 60 minutes of new runs
    python -m experiments.run --config experiments/configs/core.yaml --max_minutes 60

See ``experiments/README.md`` for the tasks, splits, methods and settings.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments" / "tasks"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import utils as task_utils  # noqa: E402  (experiments/tasks/utils.py, shared with the lm-eval YAMLs)


DEFAULT_RESULTS = REPO / "experiments" / "results" / "runs"
FORGET_ALIASES = {"mixed": ("dental", "psychol")}
# Methods that do not use the forgetting task: one run per (learning task, seed) serves every forgetting setting.
FORGET_FREE = ("base", "vanilla", "l2sp", "bss")
METHODS: dict[str, dict[str, Any]] = {
    "base": {},                                   # the pre-trained model, no training ("before")
    "vanilla": {},                                # plain fine-tuning
    "lwf": {},                                    # LWF with the package defaults (deviation confidence)
    "lwf_alignment": {"lwf_confidence": "alignment"},
    "lwf_random": {"lwf_selection": "random"},    # ablation: random selection of the same size
    "lwf_bottom": {"lwf_selection": "bottom"},    # ablation: lowest confidence
    "lwf_early": {"lwf_schedule": "early"},       # ablation: all ascent steps before fine-tuning
    "lwf_sgd": {"lwf_unlearn_optimizer": "sgd"},  # separate SGD for the ascent steps (lr = lwf_unlearn_lr)
    "ga_all": {"lwf_selection": "all"},           # gradient ascent on all of D_self (unlearning-library baseline)
    # the conflict benchmark's arms (configs/conflict_*.yaml): random selection of the same size, and the oracle,
    # the positive control: D_self is only the answers that state the review's true label, all of them forgotten
    "random": {"lwf_selection": "random"},
    "oracle": {"lwf_selection": "all"},
    # one lwf_* setting changed at a time (configs/defaults.yaml): the measurements behind the defaults
    "lwf_every3": {"lwf_unlearn_every": 3},
    "lwf_every8": {"lwf_unlearn_every": 8},
    "lwf_ratio10": {"lwf_forget_ratio": 0.1},
    "lwf_ratio50": {"lwf_forget_ratio": 0.5},
    "lwf_coef01": {"lwf_unlearn_coef": 0.1},
    "lwf_steps3": {"lwf_unlearn_steps": 3},
    "l2sp": {},                                   # hf_lwf.baselines.L2SP
    "bss": {},                                    # hf_lwf.baselines.BSS
}

# The core grid's settings (configs/core.yaml repeats them): sized for SmolLM2-135M on CPU, see experiments/README.md.
DEFAULT_SETTINGS: dict[str, Any] = {
    "max_steps": 16,
    "batch_size": 8,
    "learning_rate": 1e-4,
    "warmup_steps": 2,
    "lr_scheduler_type": "linear",
    "weight_decay": 0.0,
    "max_length": 256,
    "n_eval_learn": 150,
    "n_eval_forget": 100,
    "forget_eval": ["dental", "psychol"],
    "eval_batch_size": 16,
    "gsm8k_max_gen_toks": 256,
    "n_forget_prompts": 24,
    "threads": 1,
    "l2sp_alpha": 0.01,
    "bss_eta": 0.001,
    "bss_k": 1,
    "lwf_unlearn_every": 5,
    "lwf_samples_per_prompt": 1,
    "lwf_max_new_tokens": 48,
    "lwf_generation_batch_size": 12,
    "lwf_unlearn_lr": 0.1,  # lwf_sgd only (optimizer_probe.py)
    # the gated design (configs/pilot.yaml, mechanism.yaml); the defaults keep the legacy grid as it ran
    "eval_split": "test",        # "dev" for the pilot and every tuning decision; "test" once, in the confirmatory run
    "prompt_style": "legacy",    # "plain": sst5 as `Review: {text}\nSentiment:`
    "n_selfgen_eval": 0,         # held-out self-generated answers scored per forgetting task (0: off)
    "selfgen_eval": [],          # forgetting tasks whose held-out self-generated answers are scored
    "selfgen_max_new_tokens": 32,
    "also_eval": [],             # further tasks scored on n_eval_learn items of the split (the conflict benchmark's chat format)
    "chat_answer_prefix": task_utils.SST2_ANSWER_PREFIX,  # opens the assistant turn of sst2chat and of sst2self's D_self
}
# Forgetting tasks that exist only as prompts (no lm-eval task): the mechanism benchmark's original question, and the
# conflict benchmark's chat-format question answered after "Answer:" (balanced by true label).
PROMPT_ONLY_FORGET = ("sst2orig", "sst2self")
# Forgetting tasks whose answers follow an answer prefix in the assistant turn (task_utils.SST2_ANSWER_PREFIX).
PREFIXED_FORGET = ("sst2self",)
# sst2 training reviews (MD5 order, from the end) reserved for the forgetting prompts: never in a learning sample.
SST2_FORGET_POOL = 500


# ------------------------------------------------------------------------------------------------ data
def forget_tasks(forget: str) -> tuple[str, ...]:
    """``"dental"`` -> ``("dental",)``; ``"mixed"`` or ``"dental+psychol"`` -> both; ``"none"`` -> ``()``."""
    if forget == "none":
        return ()
    names = FORGET_ALIASES.get(forget, tuple(forget.split("+")))
    for name in names:
        if name not in task_utils.FILES and name not in PROMPT_ONLY_FORGET:
            raise ValueError(f"Unknown forgetting task {name!r}; choose from "
                             f"{', '.join((*task_utils.FILES, *PROMPT_ONLY_FORGET))} or mixed.")
    return names


def _read_jsonl(path: str):
    from datasets import load_dataset

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file {path} (see --data_dir / --eval_data_dir).")
    return load_dataset("json", data_files=path, split="train")


def load_split(task: str, data_dir: str, split: str, eval_dir: str | None = None):
    """The ``train``, ``dev`` or ``test`` split of ``task`` from local JSON Lines, labelled rows only.

    The training split drops every document whose normalised stem occurs in the dev or test split (exact
    duplicates across files, such as the few sst5 sentences in both train and dev); shared files are cut by stem
    group, so no stem is in two splits. With a separate ``eval_dir`` (``--eval_data_dir``), the training split also
    drops every stem of that directory's dev and test files, which are then evaluated whole.
    """
    source = task_utils.source_task(task)
    if source not in task_utils.FILES:
        raise ValueError(f"Unknown task {task!r}; choose from {', '.join(task_utils.FILES)}.")
    exclude: set[str] = set()
    if split == "train":
        for other in ("dev", "test"):
            if task_utils.FILES[source][other] != task_utils.FILES[source]["train"]:
                path = os.path.join(data_dir, task_utils.FILES[source][other])
                if os.path.isfile(path):
                    exclude.update(task_utils.group_key(d) for d in _read_jsonl(path))
        if eval_dir is not None and os.path.abspath(eval_dir) != os.path.abspath(data_dir):
            for other in ("dev", "test"):
                path = os.path.join(eval_dir, task_utils.FILES[source][other])
                if os.path.isfile(path):
                    exclude.update(task_utils.group_key(d) for d in _read_jsonl(path))
    dataset = _read_jsonl(os.path.join(data_dir, task_utils.FILES[source][split]))
    docs = task_utils.split_docs(dataset, source, split, exclude_groups=exclude)
    return task_utils.sst2_docs(docs) if source != task else docs


def is_sst2(task: str) -> bool:
    """Whether ``task`` is one of the binary sentiment tasks cut from sst5's files (neutral left out)."""
    return task_utils.source_task(task) == "sst5" and task != "sst5"


def balanced(docs, n: int):
    """The first ``n // 2`` documents of each true sentiment (positive, negative) in ``docs``' order, in that order.

    The conflict benchmark's D_self is balanced by true label, so that its answers cannot all be one label word."""
    per_label, counts, keep = n // 2, [0, 0], []
    for i, doc in enumerate(docs):
        label = task_utils.sst2_true_index(doc)
        if counts[label] < per_label:
            counts[label] += 1
            keep.append(i)
    if counts != [per_label, per_label]:
        raise ValueError(f"only {counts} positive / negative documents for a balanced set of {n}.")
    return docs.select(keep)


def sst2_pools(data_dir: str, eval_dir: str | None = None):
    """``(learning pool, forgetting pool)`` of sst2 training reviews: disjoint, the last SST2_FORGET_POOL for forgetting."""
    docs = load_split("sst2swap", data_dir, "train", eval_dir)
    n = len(docs) - min(SST2_FORGET_POOL, len(docs) // 2)
    return docs.select(range(n)), docs.select(range(n, len(docs)))


def encode_example(tokenizer, context: str, continuation: str, max_length: int, eos: bool) -> dict[str, list[int]]:
    """Token ids of ``context + continuation`` with the context masked, split as lm-eval splits them."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_len = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    if eos and tokenizer.eos_token_id is not None:
        whole = whole + [tokenizer.eos_token_id]
    labels = [-100] * context_len + whole[context_len:]
    ids, labels = whole[-max_length:], labels[-max_length:]  # keep the answer; cut the prompt's start if needed
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def learning_dataset(task: str, tokenizer, data_dir: str, n: int, seed: int, max_length: int,
                     prompt_style: str = "legacy", eval_dir: str | None = None):
    """``n`` training examples of ``task`` drawn with ``seed``, formatted exactly as lm-eval scores them."""
    from datasets import Dataset

    docs = sst2_pools(data_dir, eval_dir)[0] if is_sst2(task) else load_split(task, data_dir, "train", eval_dir)
    docs = docs.shuffle(seed=seed)
    docs = docs.select(range(min(n, len(docs))))
    to_text = task_utils.doc_to_text(task, prompt_style)
    delimiter = task_utils.TARGET_DELIMITER.get(task, " ")
    rows = [encode_example(tokenizer, to_text(d), delimiter + task_utils.target_text(task, d),
                           max_length, eos=task == "gsm8k") for d in docs]
    return Dataset.from_list(rows)


def _prompt_docs(task: str, data_dir: str, split: str, eval_dir: str | None = None, n: int | None = None):
    """The documents behind ``task``'s prompts in ``split`` (the first ``n``; ``sst2self``: balanced by true label)."""
    if task in PROMPT_ONLY_FORGET:
        docs = sst2_pools(data_dir, eval_dir)[1] if split == "train" else load_split("sst2swap", data_dir, split)
        if task == "sst2self":
            return balanced(docs, n if n is not None else len(docs))
    else:
        docs = load_split(task, data_dir, split, eval_dir)
    return docs if n is None else docs.select(range(min(n, len(docs))))


def _user_prompt(task: str, doc) -> str:
    return task_utils.sst2_user_message(doc) if task in PROMPT_ONLY_FORGET else task_utils.DOC_TO_TEXT[task](doc)


def with_answer_prefix(tokenizer, prefix: str):
    """A shallow copy of ``tokenizer`` whose chat template opens the assistant turn with ``prefix``.

    Self-generation (``hf_lwf``) formats a forgetting prompt as one user turn through the tokenizer's chat
    template; this copy makes the model answer after ``prefix`` (``Answer:``), so that D_self holds the bare label
    word in exactly the frame the chat-format endpoint scores (``task_utils.sst2chat_doc_to_text``)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("An answer prefix needs a tokenizer with a chat template.")
    patched = copy.copy(tokenizer)
    patched.chat_template = template + "{% if add_generation_prompt %}{% raw %}" + prefix + "{% endraw %}{% endif %}"
    return patched


def prompt_tokenizer(task: str, tokenizer):
    """The tokenizer that formats ``task``'s self-generation prompts (with the answer prefix in force where the task
    has one: the ``chat_answer_prefix`` setting, ``task_utils.answer_prefix()``)."""
    return with_answer_prefix(tokenizer, task_utils.answer_prefix()) if task in PREFIXED_FORGET else tokenizer


def forget_prompts(forget: str, data_dir: str, n_total: int, eval_dir: str | None = None) -> dict[str, list[str]]:
    """The forgetting prompts, ``n_total`` split evenly over the tasks: questions of their *training* splits.

    ``sst2orig`` (the mechanism benchmark) takes the binary sentiment question on training reviews reserved for it
    (never in a learning sample); ``sst2self`` (the conflict benchmark) the same question on those reviews, balanced
    by true label; the self-generation step wraps each prompt in the chat template.
    """
    return {task: [p for _, p in pairs] for task, pairs in forget_prompt_docs(forget, data_dir, n_total, eval_dir).items()}


def forget_prompt_docs(forget: str, data_dir: str, n_total: int, eval_dir: str | None = None) -> dict[str, list]:
    """``{task: [(document, prompt), ...]}`` of :func:`forget_prompts`: which review or question each prompt asks."""
    tasks = forget_tasks(forget)
    per_task = max(1, n_total // len(tasks))
    return {task: [(d, _user_prompt(task, d)) for d in _prompt_docs(task, data_dir, "train", eval_dir, per_task)]
            for task in tasks}


def selfgen_eval_set(model, tokenizer, task: str, data_dir: str, split: str, n: int, max_new_tokens: int,
                     cache_dir: str, model_name: str) -> dict[str, Any]:
    """The untrained model's greedy answers to ``n`` held-out prompts of ``task`` (its ``split``, never in D_self).

    Generated once per (model, task, split, n) and cached as JSON under ``cache_dir`` (doc ids and the answers'
    token ids; the prompts are rebuilt from the data), so every run scores the same answers.
    """
    from hf_lwf.method.selfgen import generate_responses, generation_mode

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    path = os.path.join(cache_dir, f"{safe}__{task}__{split}__n{n}__t{max_new_tokens}.json")
    docs = _prompt_docs(task, data_dir, split, n=n)
    prompt_ids = [encode_prompt_ids(prompt_tokenizer(task, tokenizer), _user_prompt(task, d)) for d in docs]
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached["doc_ids"] != [str(d["id"]) for d in docs]:
            raise ValueError(f"{path} was generated from other documents; delete it to regenerate.")
        return dict(cached, prompt_ids=prompt_ids)
    responses = []
    with generation_mode(model, tokenizer):
        for start in range(0, len(prompt_ids), 8):
            responses += generate_responses(model, tokenizer, prompt_ids[start:start + 8],
                                            max_new_tokens=max_new_tokens, temperature=0.0)
    record = {"model": model_name, "task": task, "split": split, "doc_ids": [str(d["id"]) for d in docs],
              "response_ids": responses, "texts": [tokenizer.decode(r, skip_special_tokens=True) for r in responses]}
    os.makedirs(cache_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return dict(record, prompt_ids=prompt_ids)


def encode_prompt_ids(tokenizer, prompt: str) -> list[int]:
    from hf_lwf.method.selfgen import encode_prompt

    return encode_prompt(tokenizer, prompt)


@torch.no_grad()
def answer_logliks(model, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float | None]:
    """Mean per-token log-likelihood of each response given its prompt, one sequence at a time (no padding)."""
    was_training = model.training
    model.eval()
    out: list[float | None] = []
    try:
        for prompt, response in zip(prompt_ids, response_ids):
            if not response:
                out.append(None)
                continue
            device = next(model.parameters()).device
            ids = torch.tensor([list(prompt) + list(response)], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response, device=device)[:, None])
            out.append(float(logp.mean()))
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------ runs
@dataclasses.dataclass(frozen=True)
class RunSpec:
    learn: str
    forget: str
    method: str
    seed: int
    variant: str = ""  # a named setting of the method (a grid block's ``variant``), e.g. one dose of a sweep

    @property
    def arm(self) -> str:
        """The method, with its variant: ``oracle`` or ``oracle-d3``."""
        return f"{self.method}-{self.variant}" if self.variant else self.method

    @property
    def run_id(self) -> str:
        return f"{self.learn}__{self.forget}__{self.arm}__s{self.seed}"


def make_spec(learn: str, forget: str, method: str, seed: int, variant: str = "") -> RunSpec:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")
    if learn not in task_utils.DOC_TO_TEXT:
        raise ValueError(f"Unknown learning task {learn!r}; choose from {', '.join(task_utils.DOC_TO_TEXT)}.")
    if method in FORGET_FREE:
        forget = "none"
    elif forget == "none":
        raise ValueError(f"Method {method!r} needs a forgetting task (--forget).")
    else:
        if learn in forget_tasks(forget):
            raise ValueError(f"The learning task {learn!r} cannot also be a forgetting task.")
    if method == "base":
        seed = 0  # deterministic: one evaluation serves every seed
    if variant and not all(c.isalnum() or c in "_." for c in variant):
        raise ValueError(f"A variant name takes letters, digits, '_' and '.', got {variant!r}.")
    return RunSpec(learn, forget, method, int(seed), variant)


def load_model(model: str | None):
    """``(model, tokenizer, name)``: SmolLM2-135M-Instruct by default, else a Hub id or local directory."""
    from hf_lwf.app.models import load_model_and_tokenizer, load_smollm2

    if model is None:
        m, tok = load_smollm2()
        name = "SmolLM2-135M-Instruct"
    else:
        m, tok = load_model_and_tokenizer(model)
        name = model
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return m, tok, name


def _training_args(spec: RunSpec, settings: dict[str, Any], output_dir: str, prompts):
    from hf_lwf import LWFTrainingArguments
    from transformers import TrainingArguments

    common = dict(
        max_steps=settings["max_steps"], per_device_train_batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"], warmup_steps=settings["warmup_steps"],
        lr_scheduler_type=settings["lr_scheduler_type"], weight_decay=settings["weight_decay"],
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        seed=spec.seed, data_seed=spec.seed, dataloader_pin_memory=False,
    )
    if spec.method in FORGET_FREE:
        return TrainingArguments(output_dir, **common)
    lwf = {k: v for k, v in settings.items() if k.startswith("lwf_") and v is not None}
    lwf.update(METHODS[spec.method])
    if lwf.get("lwf_unlearn_optimizer") == "sgd":
        lwf.setdefault("lwf_unlearn_lr", settings["learning_rate"])
    elif "lwf_unlearn_lr" in lwf:
        del lwf["lwf_unlearn_lr"]
    return LWFTrainingArguments(output_dir, **common, **lwf, lwf_forget_prompts=prompts, lwf_seed=spec.seed)


def train(spec: RunSpec, model, tokenizer, settings: dict[str, Any], data_dir: str, work_dir: str,
          eval_dir: str | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place with the run's method; return what to record about training."""
    from transformers import Trainer

    from hf_lwf import LWFTrainer
    from hf_lwf.baselines import BSS, L2SP, RegularizedTrainer
    from hf_lwf.app.learning_data import LearningCollator
    from hf_lwf.app.report import lwf_summary

    n_train = settings["max_steps"] * settings["batch_size"]
    dataset = learning_dataset(spec.learn, tokenizer, data_dir, n_train, spec.seed, settings["max_length"],
                               settings["prompt_style"], eval_dir)
    record: dict[str, Any] = {}
    prompts, prompt_docs, lwf_tokenizer = None, None, tokenizer
    if spec.method not in FORGET_FREE:
        prompt_docs = forget_prompt_docs(spec.forget, data_dir, settings["n_forget_prompts"], eval_dir)
        prefixed = [t for t in prompt_docs if t in PREFIXED_FORGET]
        if prefixed:
            if len(prompt_docs) > 1:
                raise ValueError(f"--forget {spec.forget!r}: {prefixed[0]} cannot be mixed with other forgetting tasks.")
            lwf_tokenizer = prompt_tokenizer(prefixed[0], tokenizer)
        if spec.method == "oracle":
            prompt_docs, record["oracle"] = oracle_prompt_docs(model, lwf_tokenizer, prompt_docs, settings, spec.seed)
        prompts = {task: [p for _, p in pairs] for task, pairs in prompt_docs.items()}
    args = _training_args(spec, settings, os.path.join(work_dir, spec.run_id), prompts)
    kwargs = dict(model=model, args=args, train_dataset=dataset, data_collator=LearningCollator(tokenizer.pad_token_id),
                  processing_class=lwf_tokenizer)
    if spec.method == "vanilla":
        trainer = Trainer(**kwargs)
    elif spec.method == "l2sp":
        trainer = RegularizedTrainer(**kwargs, regularizers=[L2SP(l2sp_alpha=settings["l2sp_alpha"])])
    elif spec.method == "bss":
        trainer = RegularizedTrainer(**kwargs, regularizers=[BSS(bss_eta=settings["bss_eta"], bss_k=settings["bss_k"])])
    else:
        trainer = LWFTrainer(**kwargs)
    start = time.perf_counter()
    trainer.train()
    record.update({
        "train_seconds": time.perf_counter() - start,
        "train_examples": len(dataset),
        "log_history": trainer.state.log_history,
        "training_args": {k: v for k, v in args.to_dict().items() if k in TRAINING_ARGS_RECORDED},
    })
    if isinstance(trainer, LWFTrainer):
        summary = lwf_summary(trainer.lwf_callback, text_chars=120)
        summary.pop("config", None)
        for item in summary.get("forgotten", []):
            item.pop("prompt", None)  # dataset text stays in the data directory; the model's own answer is kept
        record["lwf"] = summary
        record["lwf_config"] = trainer.lwf_callback.config.lwf_dict()
        record["lwf_config"]["lwf_forget_prompts"] = {  # described, not copied: the text stays in the data directory
            task: f"{len(p)} prompts: " + (
                f"the sentiment question (answered after {task_utils.answer_prefix()!r}) on reserved sst2 training "
                "reviews, balanced by true label" + (", those whose greedy answer states the true label (oracle)"
                                                     if spec.method == "oracle" else "")
                if task in PREFIXED_FORGET else
                f"doc_to_text of the first {len(p)} MD5-ordered items of the {task} training split")
            for task, p in prompts.items()}
        record["d_self"] = d_self_record(trainer.lwf_callback, prompt_docs)
    del trainer
    gc.collect()
    return record


TRAINING_ARGS_RECORDED = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                          "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim", "adam_beta1",
                          "adam_beta2", "adam_epsilon", "seed", "data_seed", "bf16", "fp16")


def oracle_prompt_docs(model, tokenizer, prompt_docs: dict[str, list], settings: dict[str, Any],
                       seed: int) -> tuple[dict[str, list], dict[str, Any]]:
    """The oracle's forgetting prompts: of ``prompt_docs`` (the ``lwf`` arm's D_self prompts), the first
    ``lwf_forget_top_k`` (half per true label) whose greedy answer from ``model`` states the review's true label in
    the scored form.

    With greedy decoding and one answer per prompt, D_self is a function of the prompt, so the oracle's own D_self
    (generated by the trainer from the same weights, one prompt per ``generate`` call) is exactly these answers and
    ``lwf_selection: all`` forgets all of them: D_U = the answers that state the true label, at the ``lwf`` arm's
    D_U size. Returns the chosen prompts and a record of the choice.
    """
    from hf_lwf.method.selfgen import generate_self_data

    size = settings.get("lwf_forget_top_k")
    if len(prompt_docs) != 1 or next(iter(prompt_docs)) not in PREFIXED_FORGET:
        raise ValueError(f"The oracle needs one forgetting task of {PREFIXED_FORGET}, got {sorted(prompt_docs)}.")
    if not isinstance(size, int) or size < 2 or size % 2:
        raise ValueError(f"The oracle takes lwf_forget_top_k answers (half per true label): set it to an even number "
                         f">= 2, got {size!r}.")
    if settings.get("lwf_temperature") != 0 or settings.get("lwf_samples_per_prompt") != 1 \
            or settings.get("lwf_generation_batch_size") != 1:
        raise ValueError("The oracle needs a deterministic D_self: lwf_temperature 0, lwf_samples_per_prompt 1 and "
                         "lwf_generation_batch_size 1 (no padding), got "
                         f"{settings.get('lwf_temperature')!r}, {settings.get('lwf_samples_per_prompt')!r}, "
                         f"{settings.get('lwf_generation_batch_size')!r}.")
    task, pairs = next(iter(prompt_docs.items()))
    data = generate_self_data(model, tokenizer, {task: [p for _, p in pairs]}, samples_per_prompt=1,
                              max_new_tokens=settings["lwf_max_new_tokens"], temperature=0.0, batch_size=1,
                              seed=seed, show_progress=False)
    answers = dict(zip(data["prompt"], data["text"]))
    chosen, counts, classes = [], [0, 0], {c: 0 for c in task_utils.AUDIT_CLASSES}
    for doc, prompt in pairs:
        text = answers.get(prompt, "")
        classes[task_utils.audit_class(text, doc)] += 1
        label, scored = task_utils.answer_label(text)
        true = task_utils.sst2_true_index(doc)
        if label == true and scored and counts[true] < size // 2:
            counts[true] += 1
            chosen.append((doc, prompt))
    if counts != [size // 2, size // 2]:
        raise ValueError(f"The oracle found only {counts} positive / negative reviews whose greedy answer states the "
                         f"true label among {len(pairs)} prompts; raise n_forget_prompts or lower lwf_forget_top_k.")
    return {task: chosen}, {"candidates": len(pairs), "candidate_classes": classes, "size": len(chosen),
                            "doc_ids": [str(d["id"]) for d, _ in chosen]}


def d_self_record(callback, prompt_docs: dict[str, list]) -> list[dict[str, Any]]:
    """Per D_self answer: its task, the document it answers (id), the answer, its confidence, whether it was
    forgotten, and for the sentiment tasks what it says against the review (``task_utils.audit_class``)."""
    data, state = callback.self_data, callback.lwf_state
    if data is None:
        return []
    by_prompt = {(task, p): d for task, pairs in prompt_docs.items() for d, p in pairs}
    selected = set(state.forget_indices)
    out = []
    for i, row in enumerate(data):
        doc = by_prompt.get((row["task"], row["prompt"]))
        item = {"index": i, "task": row["task"], "doc_id": None if doc is None else str(doc["id"]),
                "text": row["text"][:120], "n_tokens": len(row["response_ids"]),
                "score": state.scores[i] if i < len(state.scores) else None, "forgotten": i in selected}
        if doc is not None and row["task"] in PROMPT_ONLY_FORGET:
            label, scored = task_utils.answer_label(row["text"])
            item.update({"true_label": task_utils.SST2_CHOICES[task_utils.sst2_true_index(doc)],
                         "audit": task_utils.audit_class(row["text"], doc), "scored_form": scored})
        out.append(item)
    return out


def run_one(spec: RunSpec, settings: dict[str, Any], data_dir: str, eval_data_dir: str | None, results_dir: str,
            model_name: str | None = None, work_dir: str | None = None, loaded=None,
            code_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and evaluate one run and write ``<results_dir>/<run_id>.json``; returns the record.

    ``code_state`` is :func:`code_provenance` taken when the worker started (the code it imported); by default it is
    taken now. The record's ``provenance`` holds it with the UTC start and end, the package versions, the data files
    read (by name under the data directory, with their SHA-256) and, for LWF runs, the resolved ``lwf_*`` settings.
    """
    from experiments.evaluation import evaluate

    torch.set_num_threads(int(settings["threads"]))
    started, cpu_started = time.perf_counter(), time.process_time()
    utc_start = utc_now()
    code = code_state or code_provenance()
    if loaded is None:
        model, tokenizer, name = load_model(model_name)
    else:
        base_model, tokenizer, name = loaded
        model = copy.deepcopy(base_model)
    torch.manual_seed(spec.seed)
    task_utils.set_chat_tokenizer(tokenizer, settings["chat_answer_prefix"])
    work_dir = work_dir or tempfile.mkdtemp(prefix="hf_lwf_exp_")
    record: dict[str, Any] = {"run_id": spec.run_id, "spec": dataclasses.asdict(spec), "model": name,
                              "settings": settings}
    try:
        eval_dir = eval_data_dir or data_dir
        selfgen = {}
        if settings["n_selfgen_eval"]:  # from the untrained weights, before training (cached after the first run)
            cache = os.path.join(results_dir, "selfgen_eval")
            for task in settings["selfgen_eval"]:
                selfgen[task] = selfgen_eval_set(model, tokenizer, task, eval_dir, settings["eval_split"],
                                                 settings["n_selfgen_eval"], settings["selfgen_max_new_tokens"],
                                                 cache, name)
        if spec.method != "base":
            record["train"] = train(spec, model, tokenizer, settings, data_dir, work_dir, eval_data_dir)
        whole = eval_data_dir is not None and os.path.abspath(eval_data_dir) != os.path.abspath(data_dir)
        start = time.perf_counter()
        common = dict(data_dir=eval_dir, batch_size=settings["eval_batch_size"], whole_files=whole,
                      max_gen_toks=settings["gsm8k_max_gen_toks"], seed=spec.seed, split=settings["eval_split"],
                      prompt_style=settings["prompt_style"])
        learn_tasks = [spec.learn, *(t for t in settings["also_eval"] if t != spec.learn)]
        scores = evaluate(model, tokenizer, learn_tasks, limit=settings["n_eval_learn"], **common)
        others = [t for t in settings["forget_eval"] if t not in learn_tasks]
        if others:
            scores.update(evaluate(model, tokenizer, others, limit=settings["n_eval_forget"], **common))
        record["eval"] = scores
        if selfgen:
            record["selfgen_eval"] = {}
            for task, data in selfgen.items():
                lls = answer_logliks(model, data["prompt_ids"], data["response_ids"])
                valid = [x for x in lls if x is not None]
                record["selfgen_eval"][task] = {
                    "metric": "mean per-token log-likelihood of the untrained model's greedy answers (held-out prompts)",
                    "score": sum(valid) / max(len(valid), 1), "items": lls, "doc_ids": data["doc_ids"]}
        record["eval_seconds"] = time.perf_counter() - start
    finally:
        shutil.rmtree(os.path.join(work_dir, spec.run_id), ignore_errors=True)
        del model
        gc.collect()
    record["total_seconds"] = time.perf_counter() - started
    record["cpu_seconds"] = time.process_time() - cpu_started  # all threads of this process; wall time varies with load
    record["versions"] = _versions()
    record["provenance"] = run_provenance(code, utc_start, record, spec, settings, data_dir, eval_data_dir)
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{spec.run_id}.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=_json_default)
    os.replace(tmp, path)
    return record


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _versions() -> dict[str, str]:
    """Python, the packages a run imports (as installed) and the torch thread count."""
    from importlib import metadata

    import hf_lwf

    out = {"python": platform.python_version(), "hf_lwf": hf_lwf.__version__, "threads": str(torch.get_num_threads())}
    for package in ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "lm_eval", "numpy",
                    "scipy"):
        try:
            out[package] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


# ------------------------------------------------------------------------------------------------ provenance
# The code a worker imports: a change to these files after the worker started means the run did not run the commit.
CODE_PATHS = ("hf_lwf", "experiments/run.py", "experiments/evaluation.py", "experiments/tasks")
# Paths whose untracked files do not make the tree dirty: run outputs written while workers run.
OUTPUT_PATHS = ("experiments/results/", "experiments/logs/")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git(*args: str, repo: Path = REPO) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def code_provenance(repo: Path = REPO) -> dict[str, Any]:
    """The repository's commit (40 hex) and whether the working tree is dirty: a tracked file changed, or an untracked
    file outside the run outputs (``OUTPUT_PATHS``). ``commit`` is None outside a git checkout (then dirty)."""
    commit = (_git("rev-parse", "HEAD", repo=repo) or "").strip() or None
    status = _git("status", "--porcelain", "--untracked-files=all", repo=repo)
    changed = [] if status is None else [line[3:] for line in status.splitlines()
                                         if not (line.startswith("??") and line[3:].startswith(OUTPUT_PATHS))]
    return {"commit": commit, "dirty": commit is None or status is None or bool(changed), "dirty_files": changed[:20]}


def code_changed_since(commit: str | None, repo: Path = REPO) -> bool:
    """Whether the files a worker imports (``CODE_PATHS``) differ on disk from ``commit`` (None: unknown, True)."""
    if not commit:
        return True
    try:
        out = subprocess.run(["git", "diff", "--quiet", commit, "--", *CODE_PATHS], cwd=repo, capture_output=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True
    untracked = _git("ls-files", "--others", "--exclude-standard", "--", *CODE_PATHS, repo=repo)
    return out.returncode != 0 or bool(untracked and untracked.strip())


def data_files(spec: RunSpec, settings: dict[str, Any], data_dir: str, eval_dir: str | None) -> dict[str, Any]:
    """The data files a run read, by name under their data directory (never a machine path), with SHA-256."""
    def describe(task: str, split: str, root: str) -> dict[str, str]:
        name = task_utils.file_for(task, split)
        return {"task": task, "split": split, "file": name, "sha256": _sha256(os.path.join(root, name))}

    forget = () if spec.method in FORGET_FREE else forget_tasks(spec.forget)
    train = [describe(spec.learn, "train", data_dir)]
    train += [describe("sst2swap" if t in PROMPT_ONLY_FORGET else t, "train", data_dir) for t in forget]
    evaluated = [spec.learn, *settings["also_eval"], *settings["forget_eval"]]
    evaluated += ["sst2swap" if t in PROMPT_ONLY_FORGET else t for t in settings["selfgen_eval"]
                  if settings["n_selfgen_eval"]]
    root = eval_dir or data_dir
    seen, files = set(), []
    for task in evaluated:
        item = describe(task, settings["eval_split"], root)
        if (item["file"], item["split"]) not in seen:
            seen.add((item["file"], item["split"]))
            files.append(item)
    unique = list({(f["file"], f["split"]): f for f in train}.values())
    return {"source": "the project's shared data sets (data/README.md: sst5 = Stanford Sentiment Treebank via "
                      "prrao87/fine-grained-sentiment; dental = MedMCQA Dental; psychol = MMLU psychology)",
            "train": unique, "train_note": "the training split leaves out every stem of the task's dev and test files",
            "eval": files, "separate_eval_dir": eval_dir is not None
            and os.path.abspath(eval_dir) != os.path.abspath(data_dir)}


def _sha256(path: str) -> str | None:
    import hashlib

    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_provenance(code: dict[str, Any], utc_start: str, record: dict[str, Any], spec: RunSpec,
                   settings: dict[str, Any], data_dir: str, eval_dir: str | None) -> dict[str, Any]:
    """Where a run file comes from: the commit, whether the tree was dirty (at the worker's start, or the imported code
    changed on disk since), UTC start and end, package versions, the resolved LWF settings and the data by name."""
    changed = code_changed_since(code.get("commit"))
    train = record.get("train") or {}
    return {"commit": code.get("commit"), "dirty": bool(code.get("dirty") or changed),
            "dirty_files": code.get("dirty_files", []), "code_changed_during_run": changed,
            "utc_start": utc_start, "utc_end": utc_now(), "versions": record.get("versions") or _versions(),
            "lwf_resolved": train.get("lwf_config"), "training_args": train.get("training_args"),
            "data": data_files(spec, settings, data_dir, eval_dir)}


# ------------------------------------------------------------------------------------------------ grid
def load_config(path: str) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    unknown = set(config) - {"model", "settings", "grid", "description"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} (allowed: model, settings, grid, description).")
    return config


def grid_specs(grid: list[dict[str, Any]]) -> list[RunSpec]:
    """Runs of a grid in priority order: block by block, cell by cell, seed by seed, then method; no duplicates."""
    return [spec for spec, _ in grid_plan(grid)]


def grid_plan(grid: list[dict[str, Any]]) -> list[tuple[RunSpec, dict[str, Any]]]:
    """``(run, the block's own settings)`` in priority order; a block may carry ``settings`` that override the config's."""
    specs, seen = [], set()
    for block in grid:
        unknown = set(block) - {"learn", "forget", "methods", "seeds", "settings", "variant"}
        if unknown:
            raise ValueError(f"grid block {block}: unknown keys {sorted(unknown)}.")
        for learn, forget in itertools.product(block["learn"], block.get("forget", ["none"])):
            for seed in block["seeds"]:
                for method in block["methods"]:
                    spec = make_spec(learn, forget, method, seed, block.get("variant", ""))
                    if spec not in seen:
                        seen.add(spec)
                        specs.append((spec, block.get("settings") or {}))
    return specs


def merged_settings(config_settings: dict[str, Any] | None, overrides: list[str]) -> dict[str, Any]:
    """The default settings, updated by the config's ``settings`` and then by ``--set key=value`` overrides."""
    settings = dict(DEFAULT_SETTINGS)
    for source in (config_settings or {}), dict(_parse_override(o) for o in overrides):
        for key, value in source.items():
            if key not in settings and not key.startswith("lwf_"):
                raise ValueError(f"Unknown setting {key!r}; known: {', '.join(sorted(settings))} and lwf_* fields.")
            settings[key] = value
    if settings["eval_split"] not in ("dev", "test"):
        raise ValueError(f"Setting eval_split must be 'dev' or 'test', got {settings['eval_split']!r}.")
    prefix = settings["chat_answer_prefix"]
    if not isinstance(prefix, str) or not prefix.strip() or "{%" in prefix or "%}" in prefix:
        raise ValueError(f"Setting chat_answer_prefix must be non-empty text without template tags, got {prefix!r}.")
    if settings["prompt_style"] not in task_utils.PROMPT_STYLES:
        raise ValueError(f"Setting prompt_style must be one of {task_utils.PROMPT_STYLES}, got "
                         f"{settings['prompt_style']!r}.")
    return settings


def _parse_override(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}.")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def claim(results_dir: str, run_id: str) -> bool:
    """Take ``<run_id>.lock`` so that parallel workers never start the same run; a dead owner's lock is taken over."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{run_id}.lock")
    owner = f"{platform.node()}:{os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = lock_owner(results_dir, run_id)
            if holder is None or holder[0] != platform.node() or pid_alive(holder[1]):
                return False
            os.remove(path)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(owner)
        return True
    return False


def lock_owner(results_dir: str, run_id: str) -> tuple[str, int] | None:
    """``(host, pid)`` written in ``<run_id>.lock``, or None when there is no readable lock."""
    try:
        with open(os.path.join(results_dir, f"{run_id}.lock"), encoding="utf-8") as f:
            host, pid = f.read().strip().rsplit(":", 1)
        return host, int(pid)
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML grid config (experiments/configs/*.yaml); with --learn only its model "
                        "and settings are used.")
    parser.add_argument("--learn", help="Learning task of a single run: " + ", ".join(task_utils.FILES))
    parser.add_argument("--forget", default="none", help="Forgetting task(s): dental, psychol, ..., mixed, a+b.")
    parser.add_argument("--method", nargs="+", default=["vanilla", "lwf"], help="Method(s): " + ", ".join(METHODS))
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="Seed(s) of a single cell.")
    parser.add_argument("--model", default=None, help="Hub id or local dir (default: SmolLM2-135M-Instruct offline).")
    parser.add_argument("--data_dir", required=True, help="The folder of data sets (JSON Lines, one folder per "
                        "task: sst5/, dental/, ...; see docs/usage.md); run files name the files read under it, never "
                        "this path.")
    parser.add_argument("--eval_data_dir", default=None,
                        help="Evaluation files (same names and schema); every item of each file is then evaluated.")
    parser.add_argument("--results_dir", default=str(DEFAULT_RESULTS), help="One JSON per run is written here.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a setting.")
    parser.add_argument("--max_minutes", type=float, default=None, help="Start no new run after this many minutes.")
    parser.add_argument("--dry_run", action="store_true", help="List pending runs and exit.")
    args = parser.parse_args(argv)

    config = load_config(args.config) if args.config else {}
    settings = merged_settings(config.get("settings"), args.set)
    model_name = args.model or config.get("model")
    if args.learn:  # one cell; a --config then only supplies the model and settings
        plan = grid_plan([{"learn": [args.learn], "forget": [args.forget], "methods": args.method, "seeds": args.seed}])
    elif args.config:
        plan = grid_plan(config.get("grid") or [])
    else:
        parser.error("give --config or --learn")
    run_settings = {spec: merged_settings({**(config.get("settings") or {}), **block}, args.set) for spec, block in plan}
    specs = [spec for spec, _ in plan]
    pending = [s for s in specs if not os.path.isfile(os.path.join(args.results_dir, f"{s.run_id}.json"))]
    print(f"[experiments] {len(specs)} runs, {len(specs) - len(pending)} finished, {len(pending)} pending", flush=True)
    if args.dry_run:
        for spec in pending:
            print("  " + spec.run_id)
        return 0
    if not pending:
        return 0
    code_state = code_provenance()  # the code this worker imports; a run records it (and whether it changed since)
    if code_state["dirty"]:
        print(f"[experiments] WARNING: the working tree is dirty ({', '.join(code_state['dirty_files'][:5])}); "
              "every run file of this worker is marked dirty", flush=True)
    torch.set_num_threads(int(settings["threads"]))
    loaded = load_model(model_name)
    started = time.time()
    for i, spec in enumerate(pending):
        if args.max_minutes is not None and time.time() - started > args.max_minutes * 60:
            print(f"[experiments] time budget reached; {len(pending) - i} runs left; the same command continues them", flush=True)
            break
        if os.path.isfile(os.path.join(args.results_dir, f"{spec.run_id}.json")) or not claim(args.results_dir, spec.run_id):
            continue  # finished or running in another worker
        t = time.time()
        print(f"[experiments] {i + 1}/{len(pending)} {spec.run_id} ...", flush=True)
        try:
            record = run_one(spec, run_settings[spec], args.data_dir, args.eval_data_dir, args.results_dir,
                             loaded=loaded, code_state=code_state)
        finally:
            os.remove(os.path.join(args.results_dir, f"{spec.run_id}.lock"))
        scores = ", ".join(f"{k} {v['score']:.3f}" for k, v in record["eval"].items())
        print(f"[experiments] done {spec.run_id} in {time.time() - t:.0f}s: {scores}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
