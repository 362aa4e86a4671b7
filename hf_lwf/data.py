"""Reading forgetting prompts from whatever users have: lists, files, Datasets, Hub ids, or a dict of those."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset, load_dataset


PROMPT_COLUMNS = ("prompt", "question", "instruction", "text")
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DEFAULT_TASK = "forget"


def load_forget_prompts(source: Any, column: str | None = None, argument: str = "lwf_forget_prompts") -> dict[str, list[str]]:
    """Normalise ``source`` into ``{task name: [prompt, ...]}``.

    A list of prompt strings is one task named ``"forget"``; a list of file paths (or several files given as
    a JSON list on the command line) is one task per file, named after the file; a dict maps task names to
    any single source. Errors name ``argument`` and the offending file or column.
    """
    if source is None:
        raise ValueError(f"`{argument}` is required: give the prompts of the forgetting task(s).")
    if isinstance(source, str) and source.lstrip()[:1] in ("[", "{"):
        try:
            source = json.loads(source)
        except json.JSONDecodeError as err:
            raise ValueError(f"`{argument}` looks like JSON but does not parse: {err}") from None
    if isinstance(source, Mapping):
        if not source:
            raise ValueError(f"`{argument}` is an empty dict: name at least one forgetting task.")
        tasks = {str(name): _load_one(src, column, f"{argument}[{name!r}]") for name, src in source.items()}
    elif isinstance(source, Sequence) and not isinstance(source, str):
        items = list(source)
        if not items:
            raise ValueError(f"`{argument}` is an empty list: give at least one prompt.")
        if not all(isinstance(item, str) for item in items):
            raise ValueError(f"`{argument}` must be a list of strings.")
        is_source = [_looks_like_source(item) for item in items]
        if all(is_source):
            tasks = {}
            for item in items:
                name = _task_name(item)
                if name in tasks:
                    raise ValueError(f"`{argument}` has two sources named {name!r}: use a dict to name them.")
                tasks[name] = _load_one(item, column, argument)
        elif any(is_source) and len(items) > 1:
            raise ValueError(
                f"`{argument}` mixes file paths and prompt strings; use a dict {{task: source}} for several tasks."
            )
        else:
            tasks = {DEFAULT_TASK: _clean(items, argument)}
    else:
        tasks = {_task_name(source) if isinstance(source, str) else DEFAULT_TASK: _load_one(source, column, argument)}
    return tasks


def _looks_like_source(text: str) -> bool:
    if os.path.exists(text) or os.path.splitext(text)[1].lower() in _FILE_BUILDERS:
        return True
    return bool(_HUB_ID.match(text))


def _task_name(source: str) -> str:
    if os.path.exists(source) or os.path.splitext(source)[1].lower() in _FILE_BUILDERS:
        return os.path.splitext(os.path.basename(source.rstrip("/")))[0]
    return source.split("/")[-1]


def _load_one(source: Any, column: str | None, argument: str) -> list[str]:
    if isinstance(source, (list, tuple)):
        if not all(isinstance(item, str) for item in source):
            raise ValueError(f"`{argument}` must be a list of strings.")
        return _clean(list(source), argument)
    if isinstance(source, Dataset):
        return _from_dataset(source, column, argument)
    if not isinstance(source, str):
        raise ValueError(f"`{argument}`: unsupported prompt source of type {type(source).__name__}.")
    extension = os.path.splitext(source)[1].lower()
    if os.path.isdir(source):
        try:
            dataset = Dataset.load_from_disk(source)
        except Exception as err:
            raise ValueError(f"`{argument}`: cannot read the dataset folder {source!r}: {err}") from None
        return _from_dataset(dataset, column, argument)
    if extension in _FILE_BUILDERS:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"`{argument}`: prompt file {source!r} does not exist.")
        if extension == ".txt":
            try:
                with open(source, encoding="utf-8") as handle:
                    return _clean([line.rstrip("\n") for line in handle], f"{argument} ({source})")
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"`{argument}`: cannot read prompt file {source!r}: {err}") from None
        try:
            dataset = load_dataset(_FILE_BUILDERS[extension], data_files=source, split="train")
        except Exception as err:
            raise ValueError(f"`{argument}`: cannot read prompt file {source!r}: {err}") from None
        return _from_dataset(dataset, column, f"{argument} ({source})")
    try:
        dataset = load_dataset(source, split="train")
    except Exception as err:
        raise ValueError(
            f"`{argument}`: {source!r} is neither a readable file nor a loadable Hub dataset ({type(err).__name__}: {err})"
        ) from None
    return _from_dataset(dataset, column, f"{argument} ({source})")


def _from_dataset(dataset: Dataset, column: str | None, argument: str) -> list[str]:
    names = dataset.column_names
    if column is not None:
        if column not in names:
            raise ValueError(
                f"`lwf_forget_prompt_column`={column!r} is not a column of {argument}; columns are {names}."
            )
    else:
        column = next((c for c in PROMPT_COLUMNS if c in names), None)
        if column is None:
            raise ValueError(
                f"{argument} has none of the columns {list(PROMPT_COLUMNS)}; set `lwf_forget_prompt_column` "
                f"(columns are {names})."
            )
    values = dataset[column]
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"Column {column!r} of {argument} must hold strings.")
    return _clean(values, argument)


def _clean(prompts: list[str], argument: str) -> list[str]:
    kept = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not kept:
        raise ValueError(f"`{argument}` has no non-empty prompt.")
    return kept
