"""Prompt formats, deterministic splits and answer extraction shared by the runner and the lm-eval task YAMLs.

One source of truth: the runner trains on exactly ``doc_to_text(doc) + " " + target`` and lm-eval scores the same
strings. Splits are deterministic and independent of file order: documents are ordered by the MD5 of their ``id``;
for files that serve both training and evaluation (qasc ``dev``, dental ``validation``, psychol ``test``) the first
``TEST_SIZE[task]`` documents in that order are the test split and the rest the training split.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any


SST5_LABELS = ["very negative", "negative", "neutral", "positive", "very positive"]
SPLITS = ("train", "dev", "test")
# The data file of each split under the data directory. Splits that share a file are carved out of it by group
# (see split_docs): test first, then dev, then train gets the rest. sst5 has its own dev and test files.
FILES = {
    "gsm8k": {"train": "gsm8k/train.jsonl", "dev": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "sst5": {"train": "sst5/train.jsonl", "dev": "sst5/dev.jsonl", "test": "sst5/test.jsonl"},
    "qasc": {"train": "qasc/dev.jsonl", "dev": "qasc/dev.jsonl", "test": "qasc/dev.jsonl"},
    "dental": {"train": "dental/validation.jsonl", "dev": "dental/validation.jsonl", "test": "dental/validation.jsonl"},
    "psychol": {"train": "psychol/test.jsonl", "dev": "psychol/test.jsonl", "test": "psychol/test.jsonl"},
}
# Items carved out of a shared file for the evaluation splits (at least; a group is never cut).
SPLIT_SIZE = {"gsm8k": {"dev": 300}, "qasc": {"test": 200, "dev": 100}, "dental": {"test": 300, "dev": 150},
              "psychol": {"test": 300, "dev": 150}}
# Tasks derived from another task's files: the mechanism benchmark reads sst5's files.
SOURCE = {"sst2swap": "sst5", "sst2plain": "sst5", "sst2chat": "sst5"}
LETTERS = "ABCDEFGH"
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_NOT_WORD = re.compile(r"[^0-9a-z]+")


def source_task(task: str) -> str:
    """The task whose data files ``task`` reads (itself, or sst5 for the mechanism benchmark)."""
    return SOURCE.get(task, task)


def file_for(task: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose from {', '.join(SPLITS)}.")
    return FILES[source_task(task)][split]


def doc_key(doc: dict[str, Any]) -> str:
    return hashlib.md5(str(doc["id"]).encode("utf-8")).hexdigest()


def normalised_stem(doc: dict[str, Any]) -> str:
    """The question (or review) text, lower-cased, punctuation and spacing removed: the unit that must not cross splits.

    QASC repeats question stems with different option sets, and MMLU/MedMCQA hold a few exact duplicates; every
    document with the same normalised stem lands in the same split.
    """
    text = doc.get("question", doc.get("text", ""))
    return " ".join(_NOT_WORD.sub(" ", str(text).lower()).split())


def group_key(doc: dict[str, Any]) -> str:
    return hashlib.md5(normalised_stem(doc).encode("utf-8")).hexdigest()


def labelled(doc: dict[str, Any]) -> bool:
    """Whether ``doc`` has a gold answer (MedMCQA's unlabelled rows have ``answer: null``)."""
    for field in ("answer", "answer_index", "label", "final_answer"):
        if field in doc:
            return doc[field] is not None
    return True


def _ordered(dataset):
    """Documents ordered by (MD5 of their normalised stem, MD5 of their id): independent of file order."""
    keys = [(group_key(d), doc_key(d)) for d in dataset]
    return dataset.select(sorted(range(len(keys)), key=keys.__getitem__))


def split_indices(task: str, docs: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Positions of ``docs`` (one loaded file) in each split that this file serves, by whole stem groups.

    Every row counts, whether or not it has an answer, so the cut never depends on which rows are labelled.
    """
    task = source_task(task)
    keys = [(group_key(d), doc_key(d)) for d in docs]
    order = sorted(range(len(docs)), key=keys.__getitem__)
    served = [s for s in ("test", "dev") if FILES[task][s] == FILES[task]["train"]]
    sizes = [SPLIT_SIZE[task][s] for s in served]
    if sum(sizes) >= len(docs):  # tiny files (tests): half of the file for evaluation, the other half for training
        sizes = [len(docs) // (2 * len(served))] * len(served)
    out: dict[str, list[int]] = {s: [] for s in (*served, "train")}
    current, taken, last_group = 0, 0, None
    for i in order:
        group = keys[i][0]
        if current < len(served) and taken >= sizes[current] and group != last_group:
            current, taken = current + 1, 0
        out[served[current] if current < len(served) else "train"].append(i)
        taken += 1
        last_group = group
    return out


def split_docs(dataset, task: str, split: str, exclude_groups: frozenset[str] | set[str] = frozenset()):
    """The ``split`` of ``task`` from its loaded file, in (stem, id) MD5 order, labelled rows only.

    ``exclude_groups`` drops documents whose normalised stem (``group_key``) is in it: the runner passes the
    evaluation files' stems when it loads the training split, so no exact duplicate is trained on and evaluated.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose from {', '.join(SPLITS)}.")
    source = source_task(task)
    if sum(FILES[source][s] == FILES[source][split] for s in SPLITS) > 1:  # a file shared with another split
        chosen = split_indices(source, list(dataset))[split]
    else:
        chosen = list(range(len(dataset)))
    docs = dataset.select(chosen)
    keep = [i for i, d in enumerate(docs) if labelled(d) and (not exclude_groups or group_key(d) not in exclude_groups)]
    return _ordered(docs.select(keep))


def split_process_docs(task: str, split: str):
    """An lm-eval ``process_docs`` hook: the ``split`` of ``task`` from its evaluation file."""
    def process(dataset):
        return split_docs(dataset, task, split)
    process.__name__ = f"{task}_{split}"
    return process


# lm-eval process_docs hooks of the task YAMLs (the test split); evaluation.task_config swaps them per split.
def qasc_test(dataset):
    return split_docs(dataset, "qasc", "test")


def dental_test(dataset):
    return split_docs(dataset, "dental", "test")


def psychol_test(dataset):
    return split_docs(dataset, "psychol", "test")


def all_docs(dataset):
    """Every labelled document of a separate evaluation file (``--eval_data_dir``)."""
    ordered = _ordered(dataset)
    return ordered.select([i for i, d in enumerate(ordered) if labelled(d)])


# ------------------------------------------------------------------------------------------ prompt formats
def _options(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def mcq_doc_to_text(doc: dict[str, Any]) -> str:
    """dental / psychol: question, lettered options, ``Answer:``."""
    return f"Question: {doc['question'].strip()}\n{_options(doc['options'])}\nAnswer:"


def qasc_doc_to_text(doc: dict[str, Any]) -> str:
    return f"Question: {doc['question'].strip()}\n{_options(doc['choices'])}\nAnswer:"


def sst5_doc_to_text(doc: dict[str, Any]) -> str:
    return f"Review: {doc['text'].strip()}\nSentiment (very negative, negative, neutral, positive, very positive):"


def gsm8k_doc_to_text(doc: dict[str, Any]) -> str:
    return f"Question: {doc['question'].strip()}\nAnswer:"


def sst5_plain_doc_to_text(doc: dict[str, Any]) -> str:
    """The pilot's sst5 prompt (learned without collapse in the pilot, unlike the legacy prompt listing the labels)."""
    return f"Review: {doc['text'].strip()}\nSentiment:"


# ---- the mechanism benchmark: binary sentiment (sst5 without neutral) in the chat format, labels swapped
SST2_QUESTION = "Is the sentiment of this movie review positive or negative? Answer with one word."
SST2_CHOICES = ["positive", "negative"]
SST2_ANSWER_PREFIX = "Answer:"  # opens the assistant turn of the chat format: the model then answers with the bare word
_CHAT = {"tokenizer": None, "prefix": SST2_ANSWER_PREFIX}


def set_chat_tokenizer(tokenizer, answer_prefix: str = SST2_ANSWER_PREFIX) -> None:
    """The tokenizer whose chat template formats the sst2 prompts, and the conflict benchmark's answer prefix (set by
    the runner before training and scoring; the prefix is the ``chat_answer_prefix`` setting)."""
    _CHAT["tokenizer"] = tokenizer
    _CHAT["prefix"] = answer_prefix


def answer_prefix() -> str:
    """The chat format's answer prefix in force (``set_chat_tokenizer``)."""
    return _CHAT["prefix"]


def sst2_user_message(doc: dict[str, Any]) -> str:
    """The user turn of the binary sentiment question; also the forgetting prompt (D_self adds the template)."""
    return f"{SST2_QUESTION}\n\nReview: {doc['text'].strip()}"


def chat_text(message: str) -> str:
    tokenizer = _CHAT["tokenizer"]
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("The sst2 tasks need a tokenizer with a chat template: call set_chat_tokenizer(tokenizer).")
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)


def sst2_doc_to_text(doc: dict[str, Any]) -> str:
    return chat_text(sst2_user_message(doc))


def sst2_true_index(doc: dict[str, Any]) -> int:
    """Index into SST2_CHOICES of the true sentiment (labels 3-4 positive, 0-1 negative)."""
    return 0 if int(doc["label"]) >= 3 else 1


def sst2swap_target(doc: dict[str, Any]) -> int:
    """The mechanism benchmark's gold: the *swapped* label word, contradicting what the model knows."""
    return 1 - sst2_true_index(doc)


def sst2_docs(dataset):
    """sst5 without the neutral label (lm-eval ``process_docs`` for a whole file)."""
    return dataset.filter(lambda d: int(d["label"]) != 2)


# ---- the conflict benchmark: swapped binary sentiment TRAINED in a plain format, scored in the plain format and in
# the chat format where the model's zero-shot sentiment knowledge lives; both score " positive" / " negative".
def sst2plain_doc_to_text(doc: dict[str, Any]) -> str:
    """The trained format: ``Review: {text}\nSentiment:``, answered `` positive`` or `` negative``."""
    return f"Review: {doc['text'].strip()}\nSentiment:"


def sst2chat_doc_to_text(doc: dict[str, Any]) -> str:
    """The held-out format: the chat template around the sentiment question, the assistant turn opened with the
    answer prefix (``Answer:``) so that the next word is the label; also the frame of the self-generated answers."""
    return chat_text(sst2_user_message(doc)) + _CHAT["prefix"]


def answer_label(text: str) -> tuple[int | None, bool]:
    """``(index into SST2_CHOICES or None, scored form)`` of a self-generated answer to the sentiment question.

    The label is the first of the two words the answer contains, case-insensitively (``"Positive"`` counts as
    positive); the answer is in the *scored form* when it is exactly the lower-case word the endpoints score,
    optionally followed by punctuation (`` positive``, ``positive.``).
    """
    low = text.lower()
    hits = [(low.index(w), i) for i, w in enumerate(SST2_CHOICES) if w in low]
    if not hits:
        return None, False
    index = min(hits)[1]
    return index, text.strip().rstrip(".!") == SST2_CHOICES[index]


AUDIT_CLASSES = ("conflicting", "agreeing", "other")


def audit_class(text: str, doc: dict[str, Any]) -> str:
    """What a forgotten answer to ``doc``'s sentiment question says, against the swapped learning task:
    ``conflicting`` (the review's true label, the knowledge the task contradicts), ``agreeing`` (the swapped label,
    what the task wants) or ``other`` (neither word)."""
    index, _ = answer_label(text)
    if index is None:
        return "other"
    return "conflicting" if index == sst2_true_index(doc) else "agreeing"


PROMPT_STYLES = ("legacy", "plain")
DOC_TO_TEXT = {"gsm8k": gsm8k_doc_to_text, "sst5": sst5_doc_to_text, "qasc": qasc_doc_to_text,
               "dental": mcq_doc_to_text, "psychol": mcq_doc_to_text, "sst2swap": sst2_doc_to_text,
               "sst2plain": sst2plain_doc_to_text, "sst2chat": sst2chat_doc_to_text}
PLAIN = {"sst5": sst5_plain_doc_to_text}
TARGET_DELIMITER = {"sst2swap": ""}  # the chat template already ends the prompt with the assistant header


def doc_to_text(task: str, style: str = "legacy"):
    """The prompt function of ``task`` in ``style``: ``legacy`` (the old grid) or ``plain`` (the pilot's)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"Unknown prompt_style {style!r}; choose from {', '.join(PROMPT_STYLES)}.")
    return PLAIN.get(task, DOC_TO_TEXT[task]) if style == "plain" else DOC_TO_TEXT[task]


def target_text(task: str, doc: dict[str, Any]) -> str:
    """What the model is trained to say after the prompt (and the delimiter): the gold choice or the solution."""
    if task == "gsm8k":
        return doc["answer"].strip()
    if task == "sst5":
        return SST5_LABELS[int(doc["label"])]
    if task in ("sst2swap", "sst2plain", "sst2chat"):
        return SST2_CHOICES[sst2swap_target(doc)]
    if task == "qasc":
        return LETTERS[int(doc["answer_index"])]
    return LETTERS[int(doc["answer"])]


# ------------------------------------------------------------------------------------------ gsm8k scoring
def extract_final_number(text: str) -> str | None:
    """The final numeric answer of a response: after ``####`` when present, else the last number; normalised."""
    if "####" in text:
        found = _NUMBER.findall(text.split("####", 1)[1])[:1]
    else:
        found = _NUMBER.findall(text)[-1:]
    if not found:
        return None
    value = found[0].replace("$", "").replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value if value not in ("", "-") else None


def gsm8k_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    prediction = extract_final_number(results[0])
    reference = extract_final_number(str(doc["final_answer"]))
    return {"exact_match": float(prediction is not None and prediction == reference)}
