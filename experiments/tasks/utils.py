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
TEST_SIZE = {"qasc": 200, "dental": 300, "psychol": 300}
# (training file, evaluation file) under the data directory; the same file means a hash split of it.
FILES = {
    "gsm8k": ("gsm8k/train.jsonl", "gsm8k/test.jsonl"),
    "sst5": ("sst5/train.jsonl", "sst5/test.jsonl"),
    "qasc": ("qasc/dev.jsonl", "qasc/dev.jsonl"),
    "dental": ("dental/validation.jsonl", "dental/validation.jsonl"),
    "psychol": ("psychol/test.jsonl", "psychol/test.jsonl"),
}
LETTERS = "ABCDEFGH"
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def doc_key(doc: dict[str, Any]) -> str:
    return hashlib.md5(str(doc["id"]).encode("utf-8")).hexdigest()


def _ordered(dataset):
    keys = [doc_key(d) for d in dataset]
    return dataset.select(sorted(range(len(keys)), key=keys.__getitem__))


def split_docs(dataset, task: str, split: str):
    """The ``"train"`` or ``"test"`` split of ``task`` from its loaded file, in MD5 order."""
    ordered = _ordered(dataset)
    if FILES[task][0] != FILES[task][1]:
        return ordered
    n = min(TEST_SIZE[task], len(ordered) // 2)  # the halving only matters for tiny test files
    return ordered.select(range(n)) if split == "test" else ordered.select(range(n, len(ordered)))


# lm-eval process_docs hooks: the test split of a shared file, or (for a separate evaluation file) all of it.
def qasc_test(dataset):
    return split_docs(dataset, "qasc", "test")


def dental_test(dataset):
    return split_docs(dataset, "dental", "test")


def psychol_test(dataset):
    return split_docs(dataset, "psychol", "test")


def all_docs(dataset):
    return _ordered(dataset)


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


DOC_TO_TEXT = {"gsm8k": gsm8k_doc_to_text, "sst5": sst5_doc_to_text, "qasc": qasc_doc_to_text,
               "dental": mcq_doc_to_text, "psychol": mcq_doc_to_text}


def target_text(task: str, doc: dict[str, Any]) -> str:
    """What the model is trained to say after the prompt (and a space): the gold choice or the full solution."""
    if task == "gsm8k":
        return doc["answer"].strip()
    if task == "sst5":
        return SST5_LABELS[int(doc["label"])]
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
