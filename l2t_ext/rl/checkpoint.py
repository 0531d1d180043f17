"""Atomic checkpoints: ``OUT/checkpoints/step_NNNNNN`` is a loadable Hugging Face directory (config.json,
model.safetensors, tokenizer files) plus ``trainer_state.pt`` (step, optimizer, scheduler, RNG states, and the
state dicts of the reward and the value head). Everything is written into a temporary directory
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


def save(out_dir: str, step: int, model, tokenizer, state: dict) -> str:
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = os.path.join(root, f".tmp_step_{step:06d}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
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


def load_state(ckpt: str) -> dict:
    """The trainer state saved beside the weights (tensors on the CPU)."""
    return torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False, map_location="cpu")


def saved_config(ckpt: str) -> dict:
    """The TrainConfig (as a dict) that the run which wrote ``ckpt`` used."""
    import json

    cfg = load_state(ckpt).get("config")
    if cfg is None:
        raise FileNotFoundError(f"{ckpt}: trainer_state.pt holds no config")
    return json.loads(cfg)


def run_dir(ckpt: str) -> str | None:
    """The run directory of ``OUT/checkpoints/step_N`` (None for a checkpoint outside a run directory)."""
    parent = os.path.dirname(os.path.abspath(ckpt))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def truncate_jsonl(path: str, step: int) -> None:
    """Drop the rows of a ``{"step": ...}`` JSON-lines log written after ``step`` (a resumed run logs them
    again); atomic."""
    import json

    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = f"{path}.tmp_{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
