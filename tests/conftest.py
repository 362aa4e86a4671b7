"""Shared fixtures: a tiny offline tokenizer and tiny random Llama / GPT-2 models built from configs."""

import json
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Tom has 3 apples and buys 4 more. How many apples does Tom have? The answer is 7.",
    "Brush your teeth twice a day and visit the dentist every six months.",
    "The mitochondria is the powerhouse of the cell. Water boils at 100 degrees.",
    "user assistant system question answer forget learn model token",
] * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped on a machine without CUDA (they are collected, so `pytest -m gpu` lists them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded; extra intra-op threads only contend on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_rank(main, *args) -> None:
    """Run a torchrun script's ``main`` and leave the process without interpreter teardown.

    A rank whose work is done can still abort at exit ("terminate called without an active exception": a C++
    thread of the distributed runtime destroyed while joinable), which fails the whole torchrun. So once ``main``
    returns (or stops with ``SystemExit``, as the crash phases do) the ranks meet at a barrier and leave with
    ``os._exit``; an exception is printed and exits 1 without waiting for the other ranks.
    """
    code = 0
    try:
        main(*args)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:  # noqa: BLE001 - any failure: report it and exit non-zero
        traceback.print_exc()
        code = 1
    if code == 0 and dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def build_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        special_tokens=["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if chat_template:
        wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@pytest.fixture
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def chat_tokenizer():
    return build_tokenizer(chat_template=True)


def tiny_llama(vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1,
        **overrides,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=256,
                        pad_token_id=0, eos_token_id=1, bos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def tied_bf16_state(seed: int = 0):
    """``(model, reference, fisher)``: a small bf16 model, its theta_ref and an F with ``|F * D|`` full of exact ties.

    Most weights did not move (D == 0 exactly, as when small AdamW steps round away in bf16), the others moved by
    +-2**-6 or +-2**-5, and F takes the values 0, 1/4, 1/2, 1 and 2, so F * D (times a power of two) is exact in
    fp32 and float64 alike. The parameters are registered out of name order, with shapes that split unevenly
    across two ranks (FSDP rows, ZeRO-3 flat slices)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    model.z = torch.nn.Linear(6, 5)
    model.a = torch.nn.Embedding(7, 3)
    model.m = torch.nn.Linear(4, 9, bias=False)
    model.to(torch.bfloat16)
    levels = torch.tensor([-2.0, -1.5, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0])
    steps = torch.tensor([0.0] * 7 + [2.0**-6, -(2.0**-6), 2.0**-5, -(2.0**-5)])
    curvatures = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0])
    reference, fisher = {}, {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            pick = lambda values: values[torch.randint(len(values), p.shape, generator=g)]  # noqa: E731
            ref = pick(levels)
            reference[name] = ref.to(torch.bfloat16)
            p.copy_(ref + pick(steps))
            fisher[name] = pick(curvatures)
    return model, reference, fisher


@pytest.fixture(params=sorted(MODELS))
def model(request, tokenizer):
    """Each tiny architecture in eval mode: Llama, and GPT-2 with its tied embeddings."""
    m = MODELS[request.param](len(tokenizer), seed=1)
    m.eval()
    return m


@pytest.fixture
def llama(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture
def gpt2(tokenizer):
    return tiny_gpt2(len(tokenizer))


LEARN_TEXTS = [f"Tom has {a} apples and buys {b} more. The answer is {a + b}." for a in range(1, 9) for b in range(1, 5)]
FORGET_PROMPTS = ["What is the capital of France?", "How often should you visit the dentist?",
                  "Why do we brush teeth?", "What is the powerhouse of the cell?"]


def learning_dataset(tokenizer, n: int = 32):
    from datasets import Dataset

    enc = tokenizer(LEARN_TEXTS[:n], truncation=True, max_length=48)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def lm_collator(tokenizer):
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


@pytest.fixture
def train_dataset(tokenizer):
    return learning_dataset(tokenizer)


def lwf_args(output_dir, **overrides):
    """Small, fast LWFTrainingArguments for tiny-model runs."""
    from hf_lwf import LWFTrainingArguments

    values = dict(
        max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
        lwf_forget_prompts=FORGET_PROMPTS, lwf_unlearn_every=2, lwf_max_new_tokens=8, lwf_unlearn_steps=2,
        lwf_forget_loss_cap=50.0,
    )
    values.update(overrides)
    return LWFTrainingArguments(str(output_dir), **values)


def write_cli_files(root):
    """What ``hf-lwf train`` reads, in ``root``: a tiny chat model and tokenizer saved with save_pretrained, a
    learning jsonl (question/answer) and a forgetting prompt file."""
    import json

    tokenizer = build_tokenizer(chat_template=True)
    tiny_llama(len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "learn.jsonl", "w", encoding="utf-8") as handle:
        for text in LEARN_TEXTS:
            question, answer = text.split(" The answer")
            handle.write(json.dumps({"question": question, "answer": "The answer" + answer}) + "\n")
    (root / "forget.txt").write_text("\n".join(FORGET_PROMPTS) + "\n")
    return root


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Every Hub call of the Trainer goes to an offline fake that records the uploads (see test_hub.FakeHubApi)."""
    import transformers.utils.hub as hf_hub_utils
    from test_hub import FakeHubApi

    api = FakeHubApi(tmp_path / "hub")
    monkeypatch.setattr(hf_hub_utils, "_hf_api", api)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return api


def write_jsonl(path, rows: list[dict]) -> None:
    """``rows`` as a JSON Lines file at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
