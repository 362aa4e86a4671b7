"""Step 1: prompt encoding, generation checks, self-generation of D_self and its collation."""

import pytest
import torch
from conftest import FORGET_PROMPTS, build_tokenizer, tiny_gpt2, tiny_llama
from transformers import LlamaConfig, LlamaModel

from hf_lwf.method.selfgen import (
    check_can_generate,
    collate_self_data,
    context_length,
    encode_prompt,
    encode_prompts,
    generate_self_data,
)


EOS, PAD, USER, ASSISTANT = 1, 0, 3, 4
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(MODELS))
def any_model(request, tokenizer):
    return MODELS[request.param](len(tokenizer), seed=3)


def _generate(model, tok, prompts=None, **kwargs):
    values = dict(samples_per_prompt=2, max_new_tokens=5, show_progress=False, seed=11)
    values.update(kwargs)
    return generate_self_data(model, tok, prompts or {"t": FORGET_PROMPTS[:2]}, **values)


class ForceTokens:
    """Forward hook on the LM head forcing ``plan[call][row] = token`` (call 0 is the prefill, then one per step)."""

    def __init__(self, plan):
        self.plan, self.calls = plan, 0

    def __call__(self, module, inputs, output):
        for row, token in self.plan.get(self.calls, {}).items():
            output[row, -1, :] = -1e4
            output[row, -1, token] = 1e4
        self.calls += 1
        return output


def _lm_head(model):
    return model.get_output_embeddings()


# ---------------------------------------------------------------- encoding


def test_plain_encoding_is_the_tokenizer(tokenizer):
    assert encode_prompt(tokenizer, "hello") == tokenizer("hello")["input_ids"] == [76, 73, 80, 80, 83]


def test_chat_template_encoding(chat_tokenizer, tokenizer):
    plain = tokenizer("hello")["input_ids"]
    ids = encode_prompt(chat_tokenizer, "hello")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids == [USER] + plain + [EOS, ASSISTANT]
    text = chat_tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                              tokenize=False)
    assert ids == chat_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_encode_prompts_context_limit(tokenizer):
    prompts = {"a": ["hi"], "b": ["short", FORGET_PROMPTS[0]]}
    n = len(encode_prompt(tokenizer, FORGET_PROMPTS[0]))
    encoded = encode_prompts(tokenizer, prompts, max_length=n + 4, max_new_tokens=4)  # exactly fits
    assert encoded == {"a": [encode_prompt(tokenizer, "hi")],
                       "b": [encode_prompt(tokenizer, "short"), encode_prompt(tokenizer, FORGET_PROMPTS[0])]}
    with pytest.raises(ValueError, match="`lwf_forget_prompts`: prompt 1 of task 'b'") as info:
        encode_prompts(tokenizer, prompts, max_length=n + 3, max_new_tokens=4)
    assert f"has {n} tokens" in str(info.value) and "lwf_max_new_tokens=4" in str(info.value)
    assert encode_prompts(tokenizer, prompts, max_length=None, max_new_tokens=10**6)["b"][1] == encoded["b"][1]


def test_prompt_too_long_for_the_model_context(any_model, tokenizer):
    assert context_length(any_model) == 256
    n = len(encode_prompt(tokenizer, FORGET_PROMPTS[0]))
    with pytest.raises(ValueError, match="lwf_forget_prompts"):
        _generate(any_model, tokenizer, {"t": [FORGET_PROMPTS[0]]}, max_new_tokens=256 - n + 1)


# ---------------------------------------------------------------- checks


def test_check_can_generate_accepts_causal_lms(any_model, tokenizer):
    check_can_generate(any_model, tokenizer)


def test_tokenizer_without_pad_is_an_error(llama):
    tok = build_tokenizer()
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        check_can_generate(llama, tok)


def test_missing_tokenizer_is_an_error(llama):
    with pytest.raises(ValueError, match="processing_class"):
        check_can_generate(llama, None)


@pytest.mark.parametrize("make", [
    lambda v: LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=v)),
    lambda v: torch.nn.Linear(4, 4),
], ids=["llama-base", "linear"])
def test_model_that_cannot_generate_is_an_error(make, tokenizer):
    model = make(len(tokenizer))
    with pytest.raises(ValueError, match=f"can `generate\\(\\)`.*{type(model).__name__} cannot"):
        check_can_generate(model, tokenizer)


# ---------------------------------------------------------------- generation


def test_rows_and_columns(any_model, chat_tokenizer):
    prompts = {"a": FORGET_PROMPTS[:2], "b": FORGET_PROMPTS[2:]}
    ds = _generate(any_model, chat_tokenizer, prompts, samples_per_prompt=2, max_new_tokens=4)
    assert ds.column_names == ["task", "prompt", "prompt_ids", "response_ids", "text"]
    assert 1 <= len(ds) <= 8
    for row in ds:
        assert row["prompt"] in prompts[row["task"]]
        assert row["prompt_ids"] == encode_prompt(chat_tokenizer, row["prompt"])
        assert 1 <= len(row["response_ids"]) <= 4
        assert row["text"] == chat_tokenizer.decode(row["response_ids"], skip_special_tokens=True)
        assert row["text"].strip()
    assert len({(r["task"], r["prompt"], r["text"].strip()) for r in ds}) == len(ds)


def test_generation_is_deterministic_for_a_seed(any_model, tokenizer):
    first = _generate(any_model, tokenizer, seed=5)
    torch.manual_seed(123)  # the global RNG state must not matter
    second = _generate(any_model, tokenizer, seed=5)
    assert first.to_list() == second.to_list()
    other = _generate(any_model, tokenizer, seed=6)
    assert other["response_ids"] != first["response_ids"]


def test_generation_does_not_disturb_the_global_rng(llama, tokenizer):
    torch.manual_seed(0)
    expected = torch.rand(5)
    torch.manual_seed(0)
    _generate(llama, tokenizer)
    assert torch.equal(torch.rand(5), expected)


def test_left_padded_batches_equal_one_prompt_at_a_time(any_model, tokenizer):
    prompts = {"t": ["Why?", FORGET_PROMPTS[0], "Hi", FORGET_PROMPTS[1]]}  # very different lengths
    batched = _generate(any_model, tokenizer, prompts, samples_per_prompt=1, temperature=0.0, batch_size=4)
    single = _generate(any_model, tokenizer, prompts, samples_per_prompt=1, temperature=0.0, batch_size=1)
    assert batched.to_list() == single.to_list()
    assert len(batched) == 4


def test_greedy_duplicates_are_dropped(any_model, tokenizer):
    once = _generate(any_model, tokenizer, samples_per_prompt=1, temperature=0.0)
    thrice = _generate(any_model, tokenizer, samples_per_prompt=3, temperature=0.0)
    assert thrice.to_list() == once.to_list()
    assert len(once) == 2


def test_response_stops_at_eos_and_empty_responses_are_dropped(any_model, tokenizer):
    space = tokenizer.encode(" ")[0]
    # Rows of one batch: 0 -> a, b, EOS (kept, cut after EOS); 1 -> EOS at once (empty, dropped);
    # 2 -> " ", EOS (whitespace only, dropped); 3 -> free-running for 6 tokens.
    a, b = 40, 41
    plan = {0: {0: a, 1: EOS, 2: space}, 1: {0: b, 2: EOS}, 2: {0: EOS}}
    hook = _lm_head(any_model).register_forward_hook(ForceTokens(plan))
    try:
        prompts = {"t": FORGET_PROMPTS}
        ds = _generate(any_model, tokenizer, prompts, samples_per_prompt=1, temperature=0.0, max_new_tokens=6,
                       batch_size=4, sort_by_length=False)  # the plan addresses batch rows in prompt order
    finally:
        hook.remove()
    rows = {r["prompt"]: r for r in ds}
    assert set(rows) == {FORGET_PROMPTS[0], FORGET_PROMPTS[3]}
    assert rows[FORGET_PROMPTS[0]]["response_ids"] == [a, b, EOS]
    assert rows[FORGET_PROMPTS[0]]["text"] == tokenizer.decode([a, b])
    free = rows[FORGET_PROMPTS[3]]["response_ids"]
    assert len(free) == 6 and PAD not in free


def test_all_empty_responses_is_an_error(llama, tokenizer):
    hook = _lm_head(llama).register_forward_hook(ForceTokens({0: {0: EOS, 1: EOS}}))
    try:
        with pytest.raises(ValueError, match="no non-empty response"):
            _generate(llama, tokenizer, samples_per_prompt=1, temperature=0.0)
    finally:
        hook.remove()


@pytest.mark.parametrize("training", [True, False])
def test_padding_side_and_mode_are_restored(llama, tokenizer, training):
    tokenizer.padding_side = "right"
    llama.train(training)
    ds = _generate(llama, tokenizer)
    assert len(ds) >= 1
    assert tokenizer.padding_side == "right"
    assert llama.training is training
    assert all(m.training is training for m in llama.modules())


def test_padding_side_and_mode_are_restored_on_error(llama, tokenizer, monkeypatch):
    tokenizer.padding_side = "right"
    llama.train()

    def boom(*args, **kwargs):
        assert tokenizer.padding_side == "left" and not llama.training
        raise RuntimeError("boom")

    monkeypatch.setattr(llama, "generate", boom)
    with pytest.raises(RuntimeError, match="boom"):
        _generate(llama, tokenizer)
    assert tokenizer.padding_side == "right"
    assert llama.training


def test_generation_leaves_weights_untouched(llama, tokenizer):
    before = [p.detach().clone() for p in llama.parameters()]
    _generate(llama, tokenizer)
    assert all(torch.equal(a, p) for a, p in zip(before, llama.parameters()))


# ---------------------------------------------------------------- collation


def test_collate_masks_prompt_and_right_pads():
    rows = [
        {"prompt_ids": [5, 6, 7], "response_ids": [8, 9]},
        {"prompt_ids": [10], "response_ids": [11, 12, 13, 1]},
        {"prompt_ids": [14, 15], "response_ids": [16]},
    ]
    batch = collate_self_data(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 1], [14, 15, 16, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, -100, -100, 8, 9],
        [-100, 11, 12, 13, 1],
        [-100, -100, 16, -100, -100],
    ]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_uses_the_pad_id():
    batch = collate_self_data([{"prompt_ids": [3], "response_ids": [4]}, {"prompt_ids": [3], "response_ids": [4, 5, 6]}],
                              pad_id=99)
    assert batch["input_ids"].tolist() == [[3, 4, 99, 99], [3, 4, 5, 6]]
    assert batch["labels"][0].tolist() == [-100, 4, -100, -100]


def test_collate_generated_rows(llama, tokenizer):
    ds = _generate(llama, tokenizer)
    batch = collate_self_data(list(ds), tokenizer.pad_token_id)
    for i, row in enumerate(ds):
        n_p, n_r = len(row["prompt_ids"]), len(row["response_ids"])
        assert batch["input_ids"][i, : n_p + n_r].tolist() == row["prompt_ids"] + row["response_ids"]
        assert int(batch["attention_mask"][i].sum()) == n_p + n_r
        assert (batch["labels"][i] != -100).nonzero().flatten().tolist() == list(range(n_p, n_p + n_r))


# ---------------------------------------------------------------- batching: length sorting, world-size independence


def test_length_sorted_batches_give_the_prompt_order_and_the_same_greedy_text(any_model, tokenizer):
    prompts = {"a": ["Why?", FORGET_PROMPTS[0]], "b": ["Hi", FORGET_PROMPTS[1], "Tell me more"]}
    sorted_ = _generate(any_model, tokenizer, prompts, samples_per_prompt=1, temperature=0.0, batch_size=2)
    plain = _generate(any_model, tokenizer, prompts, samples_per_prompt=1, temperature=0.0, batch_size=2,
                      sort_by_length=False)
    assert sorted_.to_list() == plain.to_list()
    assert [(r["task"], r["prompt"]) for r in sorted_] == [(t, p) for t in prompts for p in prompts[t]][: len(sorted_)]


def test_d_self_is_the_same_for_any_world_size(llama, tokenizer, monkeypatch):
    import hf_lwf.method.selfgen as selfgen

    prompts = {"a": FORGET_PROMPTS[:3], "b": ["Hi", "Why?"]}
    kwargs = dict(samples_per_prompt=2, batch_size=3, temperature=1.0, seed=4)
    single = _generate(llama, tokenizer, prompts, **kwargs)

    class Gathered(Exception):
        pass

    captured = {}

    def rank1_gather(obj):
        captured[1] = obj
        raise Gathered

    monkeypatch.setattr(selfgen, "rank_and_world", lambda: (1, 2))
    monkeypatch.setattr(selfgen, "gather_objects", rank1_gather)
    with pytest.raises(Gathered):
        _generate(llama, tokenizer, prompts, **kwargs)
    monkeypatch.setattr(selfgen, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(selfgen, "gather_objects", lambda obj: [obj, captured[1]])
    two_ranks = _generate(llama, tokenizer, prompts, **kwargs)
    assert captured[1] and two_ranks.to_list() == single.to_list()
