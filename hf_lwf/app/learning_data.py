"""Learning-task data for the command line and the demo: load, tokenise (prompt/response or plain text), collate.

Prompt/response rows are formatted with the tokenizer's chat template when it has one (the prompt as a user
turn, the response as the assistant turn) and only the response tokens are trained on: the prompt tokens get
label -100. Plain-text rows train on every token. Sequences are truncated to ``max_length``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_dataset

from ..method.selfgen import encode_prompt


FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
PROMPT_COLUMNS = ("prompt", "question", "instruction", "input")
RESPONSE_COLUMNS = ("response", "answer", "output", "completion")


def load_learning_dataset(source: str, split: str = "train", config_name: str | None = None) -> Dataset:
    """A learning dataset from a local json/jsonl/csv/parquet/txt file, a ``save_to_disk`` folder or a Hub id."""
    extension = os.path.splitext(source)[1].lower()
    if os.path.isdir(source):
        loaded = Dataset.load_from_disk(source) if os.path.isfile(os.path.join(source, "dataset_info.json")) else None
        if loaded is None:
            loaded = DatasetDict.load_from_disk(source)[split]
        return loaded
    if extension in FILE_BUILDERS:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"Learning dataset file {source!r} does not exist.")
        return load_dataset(FILE_BUILDERS[extension], data_files=source, split="train")
    try:
        return load_dataset(source, config_name, split=split)
    except Exception as err:
        raise ValueError(
            f"{source!r} is neither a local data file (json, jsonl, csv, parquet, txt) nor a loadable Hub dataset "
            f"({type(err).__name__}: {err})."
        ) from None


def resolve_columns(
    column_names: list[str], prompt_column: str | None, response_column: str | None, text_column: str | None
) -> tuple[str | None, str | None, str | None]:
    """Which columns to use: an explicit choice, else prompt/response pairs, else a ``text`` column."""
    for name, value in (("prompt_column", prompt_column), ("response_column", response_column), ("text_column", text_column)):
        if value is not None and value not in column_names:
            raise ValueError(f"`{name}`={value!r} is not a column of the learning dataset; columns are {column_names}.")
    if text_column is not None:
        if prompt_column is not None or response_column is not None:
            raise ValueError("Set either `text_column` or `prompt_column`/`response_column`, not both.")
        return None, None, text_column
    prompt_column = prompt_column or next((c for c in PROMPT_COLUMNS if c in column_names), None)
    response_column = response_column or next((c for c in RESPONSE_COLUMNS if c in column_names), None)
    if prompt_column and response_column:
        return prompt_column, response_column, None
    if "text" in column_names and prompt_column is None and response_column is None:
        return None, None, "text"
    raise ValueError(
        f"Cannot tell which columns hold the learning data (columns are {column_names}): set "
        "`prompt_column` and `response_column`, or `text_column` for plain text."
    )


def encode_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)``: the chat-formatted user turn and the assistant turn that follows it.

    The prompt ids equal what self-generation feeds the model (:func:`hf_lwf.method.selfgen.encode_prompt`).
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False
        )
        if full_text.startswith(prompt_text):
            response_text = full_text[len(prompt_text):]
        else:  # a template that rewrites earlier turns: fall back to the plain response
            response_text = response
        response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
        if response_text.strip() == response.strip() and tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
        return prompt_ids, response_ids
    response_ids = tokenizer("\n" + response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def encode_text(tokenizer, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


def prepare_learning_dataset(
    dataset: Dataset,
    tokenizer,
    prompt_column: str | None = None,
    response_column: str | None = None,
    text_column: str | None = None,
    max_length: int = 512,
    max_samples: int | None = None,
) -> Dataset:
    """Tokenise ``dataset`` into ``input_ids``, ``attention_mask`` and ``labels`` (prompt tokens masked).

    Rows left without any trained token after truncation (a prompt longer than ``max_length``) are dropped.
    """
    if max_length < 2:
        raise ValueError(f"`max_length` must be at least 2 (got {max_length}).")
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    prompt_column, response_column, text_column = resolve_columns(
        dataset.column_names, prompt_column, response_column, text_column
    )
    rows = []
    for example in dataset:
        if text_column is not None:
            ids = encode_text(tokenizer, str(example[text_column]))[:max_length]
            labels = list(ids)
        else:
            prompt_ids, response_ids = encode_pair(tokenizer, str(example[prompt_column]), str(example[response_column]))
            ids = (prompt_ids + response_ids)[:max_length]
            labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
        if sum(label != -100 for label in labels[1:]) == 0:
            continue
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not rows:
        raise ValueError(
            f"No learning example keeps a trained token within max_length={max_length}; raise `max_length`."
        )
    return Dataset.from_list(rows)


@dataclass
class LearningCollator:
    """Right-pads ``input_ids`` with ``pad_token_id``, ``attention_mask`` with 0 and ``labels`` with -100."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.full((len(features), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), length), dtype=torch.long),
            "labels": torch.full((len(features), length), -100, dtype=torch.long),
        }
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            batch["attention_mask"][i, :n] = torch.as_tensor(f.get("attention_mask", [1] * n), dtype=torch.long)
            batch["labels"][i, :n] = torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
        return batch
