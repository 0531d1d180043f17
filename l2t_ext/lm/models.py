"""Models and tokenizers: any local Hugging Face causal LM directory through ``from_pretrained`` (never a hub
download), or, for CPU presets and tests, a character-level tokenizer and a tiny Qwen2 built from a config."""

from __future__ import annotations

import contextlib
import os

import torch

from l2t_ext.errors import InputError, MissingFileError

SPECIALS = ("<pad>", "<eos>")
THINK_TOKENS = ("<think>", "</think>")


def char_tokenizer(chars: str, vocab_size: int | None = None):
    """A character-level tokenizer (``tokenizers`` WordLevel) over ``chars`` in which ``<think>``/``</think>``
    are single tokens, wrapped as a transformers ``PreTrainedTokenizerFast`` (left padding). ``vocab_size`` pads
    the vocabulary with placeholder tokens ``<u0>``, ``<u1>``, ... that encoding never produces but decoding
    writes out: a model with a real vocabulary's shape can then sample and be decoded (GPU shape checks)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = list(SPECIALS) + list(THINK_TOKENS) + sorted(set(chars))
    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise InputError(f"vocab_size={vocab_size} is smaller than the {len(tokens)} tokens of the alphabet")
        tokens += [f"<u{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<think>|</think>|<pad>|<eos>|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.padding_side = "left"
    return fast


def tiny_qwen2(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, kv_heads: int = 2,
               intermediate_size: int | None = None, max_positions: int = 512, seed: int = 0):
    """A randomly initialised Qwen2ForCausalLM sized for a laptop CPU (about 0.1M parameters by default;
    intermediate size 2.75 x hidden)."""
    intermediate_size = intermediate_size or 8 * round(2.75 * hidden_size / 8)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


# what a loadable Hugging Face model directory holds: one file of each group
MODEL_FILES = {
    "config": ("config.json",),
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json"),
    "tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"),
}


def check_model_dir(path: str) -> None:
    """Raise ``MissingFileError`` naming every part (config, weights, tokenizer) a model directory lacks, before
    anything is loaded; a ``.gguf`` file must exist and its readers (the ``gguf`` extra) be installed."""
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise MissingFileError(f"GGUF file not found: {path}")
        _require_gguf()
        return
    if not os.path.isdir(path):
        raise MissingFileError(f"model directory not found: {path} (l2t never downloads; pass a local path "
                               "or a preset such as 'tiny')")
    missing = [f"{part} ({' or '.join(names)})" for part, names in MODEL_FILES.items()
               if not any(os.path.isfile(os.path.join(path, n)) for n in names)]
    if missing:
        raise MissingFileError(f"{path} is not a Hugging Face model directory: no {'; no '.join(missing)}")


def _require_gguf() -> None:
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"reading a .gguf model needs {' and '.join(missing)}: pip install 'l2t_ext[gguf]'")


@contextlib.contextmanager
def _quiet_gguf_bar():
    """transformers dequantises GGUF tensors under a plain ``tqdm`` bar that no logging switch reaches; in a log
    (stderr not a terminal) that bar is replaced by a disabled one."""
    import functools
    import sys

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or sys.stderr.isatty():
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def load_gguf(path: str, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a ``.gguf`` file, dequantised to ``dtype`` (default float32) by transformers.

    transformers marks a GGUF-loaded model as quantized and refuses to ``save_pretrained`` it; the weights are
    plain tensors after dequantisation, so the architecture is rebuilt from the config and loaded with them: the
    result trains, checkpoints and converts like any Hugging Face model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(path)
    folder, name = os.path.split(os.path.abspath(path))
    with _quiet_gguf_bar():
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model.eval(), tok


def load_local(path: str, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local Hugging Face directory via ``from_pretrained`` (local files only), or from
    a ``.gguf`` file (``load_gguf``)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    if path.endswith(".gguf"):
        model, tok = load_gguf(path, dtype)
    else:
        tok = _load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                     attn_implementation="sdpa")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def _load_tokenizer(path: str):
    """AutoTokenizer, except for a generic tokenizers-backed tokenizer (like ``char_tokenizer``), which
    AutoTokenizer would replace by the model type's own class when config.json sits next to it."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cls = json.load(f).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def marker_ids(tokenizer, markers: list[str]) -> list[list[int]]:
    """Token-id sequences of the episode markers; error (with the fix) if the tokenizer cannot represent one."""
    out = []
    for m in markers:
        ids = tokenizer.encode(m, add_special_tokens=False)
        unk = getattr(tokenizer, "unk_token_id", None)
        if not ids or (unk is not None and unk in ids) or tokenizer.decode(ids) != m:
            raise InputError(f"tokenizer cannot represent the episode marker {m!r} (got ids {ids}); add it with "
                             f"tokenizer.add_tokens([{m!r}]) and model.resize_token_embeddings(len(tokenizer)), "
                             "then save both")
        out.append(ids)
    return out
