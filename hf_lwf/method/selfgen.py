"""Step 1: elicit the model's own knowledge of the forgetting task(s) as a dataset D_self."""

from __future__ import annotations

import contextlib

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from ..distributed import gather_objects, input_device, is_sharded, rank_and_world


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def context_length(model) -> int | None:
    """The longest sequence ``model`` accepts, if its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_can_generate(model, tokenizer) -> None:
    """Raise a clear error when self-generation cannot work with this model and tokenizer."""
    can_generate = getattr(model, "can_generate", None)
    if not callable(getattr(model, "generate", None)) or (callable(can_generate) and not can_generate()):
        raise ValueError(
            f"LWF needs a model that can `generate()` (a causal LM); {type(model).__name__} cannot."
        )
    if tokenizer is None:
        raise ValueError("LWF needs the tokenizer: pass `processing_class=tokenizer` to the Trainer.")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            "The tokenizer has no pad token, which batched self-generation needs: set "
            "`tokenizer.pad_token = tokenizer.eos_token` (or add one) before building the Trainer."
        )


def encode_prompts(tokenizer, prompts: dict[str, list[str]], max_length: int | None, max_new_tokens: int) -> dict[str, list[list[int]]]:
    """Tokenise every prompt; a prompt that leaves no room for ``max_new_tokens`` in the context is an error."""
    encoded = {}
    for task, texts in prompts.items():
        encoded[task] = []
        for index, text in enumerate(texts):
            ids = encode_prompt(tokenizer, text)
            if max_length is not None and len(ids) + max_new_tokens > max_length:
                raise ValueError(
                    f"`lwf_forget_prompts`: prompt {index} of task {task!r} has {len(ids)} tokens; with "
                    f"lwf_max_new_tokens={max_new_tokens} it exceeds the model's context of {max_length} tokens."
                )
            encoded[task].append(ids)
    return encoded


@contextlib.contextmanager
def generation_mode(model, tokenizer):
    """Eval mode and left padding for batched ``generate``; both are restored afterwards."""
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)


@torch.no_grad()
def generate_responses(
    model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
    synced: bool = False,
) -> list[list[int]]:
    """Response token ids (up to and including the first eos) for a batch of tokenised prompts.

    Call it inside :func:`generation_mode`. ``temperature=0`` decodes greedily. ``synced`` keeps every rank
    stepping until all have finished (``generate(synced_gpus=True)``), which sharded models need: each step's
    forward is collective.
    """
    eos_ids = _eos_ids(model, tokenizer)
    device = input_device(model)
    padded = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")
    sampling = temperature > 0
    output = model.generate(
        input_ids=padded["input_ids"].to(device),
        attention_mask=padded["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids,
        use_cache=True,
        synced_gpus=synced,
    )
    return [_cut_at_eos(tokens, eos_ids) for tokens in output[:, padded["input_ids"].shape[1] :].tolist()]


def generate_self_data(
    model,
    tokenizer,
    prompts: dict[str, list[str]],
    *,
    samples_per_prompt: int = 2,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 8,
    seed: int = 42,
    show_progress: bool = True,
    sort_by_length: bool = True,
) -> Dataset:
    """Sample ``samples_per_prompt`` responses per prompt from ``model`` as it is now.

    Batched, left-padded ``generate``; empty and duplicate responses are dropped. Each row keeps ``task``,
    ``prompt``, ``prompt_ids``, ``response_ids`` and the decoded ``text``, in prompt order.

    The jobs (prompt x sample) are sorted by prompt length before they are cut into batches, so a batch pads
    little. Batch ``b`` samples with the RNG seeded by ``seed + b`` inside a forked RNG (the training RNG stream is
    untouched), so its responses do not depend on which process generates it: under DDP the batches are shared
    round-robin across ranks and gathered back, and D_self is the same for any world size. Under FSDP the ranks
    generate in lockstep (every rank runs the same number of batches, a rank without a batch of its own repeats
    one and drops the result).
    """
    encoded = encode_prompts(tokenizer, prompts, context_length(model), max_new_tokens)
    jobs = [(task, text, ids) for task in prompts for text, ids in zip(prompts[task], encoded[task])]
    jobs = [job for job in jobs for _ in range(samples_per_prompt)]
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i][2])) if sort_by_length else list(range(len(jobs)))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    rank, world = rank_and_world()
    device = input_device(model)
    responses: dict[int, list[int]] = {}
    synced = is_sharded(model)
    with generation_mode(model, tokenizer), torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        mine = list(range(rank, len(batches), world))
        bar = tqdm(total=sum(len(batches[b]) for b in mine), desc="LWF self-generation", disable=not show_progress,
                   leave=False)
        rounds = -(-len(batches) // world) if synced else len(mine)
        for r in range(rounds):
            filler = r >= len(mine)  # under FSDP: no batch of its own left, repeat batch 0 in lockstep
            b = 0 if filler else mine[r]
            torch.manual_seed(seed + b)
            out = generate_responses(
                model, tokenizer, [jobs[i][2] for i in batches[b]],
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, synced=synced,
            )
            if filler:
                continue
            responses.update(zip(batches[b], out))
            bar.update(len(batches[b]))
        bar.close()
    if world > 1:
        for part in gather_objects(responses):
            responses.update(part)
    rows, seen = [], set()
    for i, (task, text, prompt_ids) in enumerate(jobs):
        response = responses[i]
        decoded = tokenizer.decode(response, skip_special_tokens=True)
        key = (task, text, decoded.strip())
        if not decoded.strip() or key in seen:
            continue
        seen.add(key)
        rows.append({"task": task, "prompt": text, "prompt_ids": prompt_ids, "response_ids": response, "text": decoded})
    if not rows:
        raise ValueError(
            "Self-generation produced no non-empty response for `lwf_forget_prompts`; raise `lwf_max_new_tokens` "
            "or check the prompts and the model."
        )
    return Dataset.from_list(rows)


def collate_self_data(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` that score the response tokens only."""
    sequences = [list(r["prompt_ids"]) + list(r["response_ids"]) for r in rows]
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (row, seq) in enumerate(zip(rows, sequences)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        start = len(row["prompt_ids"])
        labels[i, start : len(seq)] = torch.tensor(seq[start:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _cut_at_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: position + 1]
    return tokens
