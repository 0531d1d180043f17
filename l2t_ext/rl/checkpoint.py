"""Run directories and their checkpoints.

``OUT/checkpoints/step_NNNNNN`` is a loadable Hugging Face directory (config.json, model.safetensors, tokenizer
files) plus ``trainer_state.pt`` (step, optimizer, scheduler, RNG states, and the state dicts of the reward and
the value head), ``train_config.json`` (the run's TrainConfig) and ``manifest.json`` (every other file's size and
SHA-256). A run with ``parallel: fsdp`` adds ``dcp/``: the sharded model and optimizer state written by every rank
through ``torch.distributed.checkpoint`` (what a resume loads; the Hugging Face files are the consolidated
weights, for ``l2t eval`` and ``l2t inspect``), and its trainer state holds no optimizer.
Everything is written into a temporary directory that is renamed into place, and ``latest`` is replaced
atomically last, so a crash mid-save never corrupts the last good checkpoint; a checkpoint damaged afterwards
(truncated copy, full disk, bit rot) fails its manifest check by file name, and resuming a run directory falls
back to the newest intact one.

One process writes a run directory at a time: ``lock_run_dir`` takes an exclusive OS lock (``filelock``; the
kernel drops it when the holder dies, so a killed run's lock is taken over without a stale-lock timeout) and
records the holder's pid beside it for the error message."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import socket
import warnings

import filelock
import torch

from l2t_ext.errors import CheckpointError, MissingFileError, RunDirLocked

MANIFEST = "manifest.json"
TRAIN_CONFIG = "train_config.json"
_VERIFIED: set[tuple] = set()  # (checkpoint, (file, size, mtime) ...) already hashed by this process


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


@contextlib.contextmanager
def _no_hf_progress_bars():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save(out_dir: str, step: int, model, tokenizer, state: dict, *, model_state: dict | None = None,
         sharded_dir: str | None = None) -> str:
    """Write ``OUT/checkpoints/step_NNNNNN`` and point ``latest`` at it. ``model_state``: the weights to write
    instead of ``model.state_dict()`` (the consolidated weights of a sharded model); ``sharded_dir``: a finished
    DCP directory moved in as ``dcp/`` (and covered by the manifest)."""
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = os.path.join(root, f".tmp_step_{step:06d}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _no_hf_progress_bars():  # a "Writing model shards" bar per checkpoint is noise in every log
        model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
        tokenizer.save_pretrained(tmp)
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, TRAIN_CONFIG), "w") as f:
        f.write(state["config"])
    if sharded_dir is not None:
        os.replace(sharded_dir, os.path.join(tmp, "dcp"))
    _write_manifest(tmp, step)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = os.path.join(root, f".latest_{os.getpid()}")
    with open(latest_tmp, "w") as f:
        f.write(os.path.basename(final))
    os.replace(latest_tmp, os.path.join(root, "latest"))
    return final


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(ckpt: str) -> list[str]:
    """Every file under ``ckpt`` (relative paths, sorted; subdirectories included), the manifest excepted."""
    out = []
    for d, _, names in os.walk(ckpt):
        out += [os.path.relpath(os.path.join(d, n), ckpt) for n in names]
    return sorted(n for n in out if n != MANIFEST)


def _write_manifest(ckpt: str, step: int) -> None:
    files = {}
    for name in _files(ckpt):
        path = os.path.join(ckpt, name)
        files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    with open(os.path.join(ckpt, MANIFEST), "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)


def verify(ckpt: str) -> None:
    """Raise ``CheckpointError`` naming the first file of ``ckpt`` that is missing, of the wrong size or whose
    SHA-256 differs from the manifest written with it (hashing reads every byte: about a second per GB)."""
    path = os.path.join(ckpt, MANIFEST)
    if not os.path.exists(path) and os.path.isfile(os.path.join(ckpt, "trainer_state.pt")):
        warnings.warn(f"{ckpt} was written before checkpoints had manifests: its files cannot be verified",
                      stacklevel=2)
        return
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: missing or unreadable checkpoint manifest ({e.__class__.__name__})") from None
    for name, want in files.items():
        fp = os.path.join(ckpt, name)
        if not os.path.isfile(fp):
            raise CheckpointError(f"{fp}: missing (listed in the manifest)")
        if os.path.getsize(fp) != want["bytes"]:
            raise CheckpointError(f"{fp}: {os.path.getsize(fp)} bytes, the manifest says {want['bytes']} (truncated?)")
    # a checkpoint whose files are unchanged since this process hashed them is not read again (the CLI and the
    # Trainer both resolve a --resume path; hashing a real model's checkpoint takes seconds per GB)
    stats = [(n, os.stat(os.path.join(ckpt, n))) for n in [MANIFEST, *files]]
    stamp = (os.path.abspath(ckpt), tuple((n, st.st_size, st.st_mtime_ns) for n, st in stats))
    if stamp in _VERIFIED:
        return
    for name, want in files.items():
        if _sha256(os.path.join(ckpt, name)) != want["sha256"]:
            raise CheckpointError(f"{os.path.join(ckpt, name)}: contents differ from the manifest (SHA-256 mismatch)")
    _VERIFIED.add(stamp)


def _steps(root: str) -> list[str]:
    """Checkpoint directories under ``root``, newest first (``latest``'s target first when it exists)."""
    names = sorted((n for n in os.listdir(root) if re.fullmatch(r"step_\d+", n)), reverse=True)
    latest = os.path.join(root, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            target = f.read().strip()
        names = [target] * (target in names) + [n for n in names if n != target]
    return [os.path.join(root, n) for n in names]


def resolve(path: str) -> str:
    """The checkpoint to resume: ``path`` itself when it is one (verified; an error names a damaged file), or the
    newest intact checkpoint of a run directory, warning about every newer one that is damaged."""
    if not os.path.exists(path):
        raise MissingFileError(f"--resume {path}: no such file or directory")
    if os.path.isfile(os.path.join(path, "trainer_state.pt")) or os.path.isfile(os.path.join(path, MANIFEST)):
        verify(path)
        return path
    root = os.path.join(path, "checkpoints")
    candidates = _steps(root) if os.path.isdir(root) else []
    skipped = []
    for ckpt in candidates:
        try:
            verify(ckpt)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        if skipped:
            warnings.warn(f"skipping damaged checkpoint(s): {'; '.join(skipped)}; resuming from {ckpt}", stacklevel=2)
        return ckpt
    if skipped:
        raise CheckpointError(f"no intact checkpoint under {root}: {'; '.join(skipped)}")
    raise MissingFileError(f"--resume {path}: not a checkpoint and no checkpoints/step_* under it")


def load_state(ckpt: str) -> dict:
    """The trainer state saved beside the weights (tensors on the CPU)."""
    return torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False, map_location="cpu")


def saved_config(ckpt: str) -> dict:
    """The TrainConfig (as a dict) that the run which wrote ``ckpt`` used."""
    path = os.path.join(ckpt, TRAIN_CONFIG)
    if not os.path.isfile(path):  # written before train_config.json existed: the config is in the trainer state
        return json.loads(load_state(ckpt)["config"])
    with open(path) as f:
        return json.load(f)


def run_dir(ckpt: str) -> str | None:
    """The run directory of ``OUT/checkpoints/step_N`` (None for a checkpoint outside a run directory)."""
    parent = os.path.dirname(os.path.abspath(ckpt))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def truncate_jsonl(path: str, step: int) -> None:
    """Drop the rows of a ``{"step": ...}`` JSON-lines log written after ``step`` (a resumed run logs them
    again); atomic."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = f"{path}.tmp_{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class RunLock:
    """The exclusive lock on a run directory (see the module docstring); ``release()`` or process exit frees it."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.owner = os.path.join(out_dir, ".lock.owner")
        self._lock = filelock.FileLock(os.path.join(out_dir, ".lock"), timeout=0)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise RunDirLocked(f"run directory {out_dir} is in use by {self._holder()}; wait for it to finish, "
                               f"stop it, or pass another --out") from None
        self.previous = self._holder() if os.path.exists(self.owner) else None  # a run that died holding it
        with open(self.owner, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        root = os.path.join(out_dir, "checkpoints")  # half-written checkpoints of a run that was killed
        for name in os.listdir(root) if os.path.isdir(root) else []:
            path = os.path.join(root, name)
            if name.startswith((".tmp_step_", ".dcp_step_")):  # a save that died half-way (fsdp: its shards)
                shutil.rmtree(path, ignore_errors=True)
            elif name.startswith(".latest_"):
                os.remove(path)

    def _holder(self) -> str:
        try:
            with open(self.owner) as f:
                who = json.load(f)
            return f"pid {who['pid']} on {who['host']}"
        except (OSError, ValueError, KeyError):
            return "another process"

    def release(self) -> None:
        if self._lock.is_locked:
            with contextlib.suppress(OSError):
                os.remove(self.owner)
            self._lock.release()
