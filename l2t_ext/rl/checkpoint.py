"""Atomic checkpoints: ``OUT/checkpoints/step_NNNNNN`` is a loadable Hugging Face directory (config.json,
model.safetensors, tokenizer files) plus ``trainer_state.pt`` (optimizer, scheduler, RNG states, step) and
``extra.safetensors`` (SVD bases, value head, EMA Fisher). Everything is written into a temporary directory
that is renamed into place, and ``latest`` is replaced atomically last, so a crash mid-save never corrupts the
last good checkpoint."""

from __future__ import annotations

import os
import random
import shutil

import torch


def rng_state() -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save(out_dir: str, step: int, model, tokenizer, state: dict, tensors: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file

    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = os.path.join(root, f".tmp_step_{step:06d}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(tmp, "extra.safetensors"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = os.path.join(root, f".latest_{os.getpid()}")
    with open(latest_tmp, "w") as f:
        f.write(os.path.basename(final))
    os.replace(latest_tmp, os.path.join(root, "latest"))
    return final


def resolve(path: str) -> str:
    """A checkpoint directory: ``path`` itself, or OUT/checkpoints/<latest> for a run directory."""
    for cand in (path, os.path.join(path, "checkpoints")):
        latest = os.path.join(cand, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                return os.path.join(cand, f.read().strip())
    if os.path.isfile(os.path.join(path, "trainer_state.pt")):
        return path
    raise FileNotFoundError(f"no checkpoint found under {path} (expected trainer_state.pt or checkpoints/latest)")


def load_state(ckpt: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
    extra = load_file(os.path.join(ckpt, "extra.safetensors"))
    return state, extra
