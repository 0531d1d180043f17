"""Run directories: checkpoint manifests and the fallback to the newest intact checkpoint, the one-writer lock
(with takeover from a killed holder), and fault injection: ``l2t train`` killed with SIGKILL at random points
and resumed with ``--resume DIR`` alone ends with the same weights and metrics as an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from l2t_ext.errors import CheckpointError, MissingFileError, RunDirLocked  # noqa: E402
from l2t_ext.rl import checkpoint  # noqa: E402

TRAIN = ["train", "--preset", "tiny-arith", "--method", "l2t", "--steps", "6", "--sft_steps", "5",
         "--eval_problems", "0", "--save_every", "1", "--hidden_size", "32", "--num_layers", "1",
         "--max_new_tokens", "24", "--prompts_per_step", "2", "--group_size", "4", "--rank", "4",
         "--refresh_every", "2"]


def _l2t(args, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "l2t_ext.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _run(args, timeout=300) -> subprocess.CompletedProcess:
    p = _l2t(args)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted 6-step run with a checkpoint after every step (the reference for the tests below)."""
    out = tmp_path_factory.mktemp("runs") / "full"
    t0 = time.time()
    res = _run(TRAIN + ["--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    return out, time.time() - t0


def _final(out):
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    return load_file(out / "checkpoints" / "step_000006" / "model.safetensors"), rows


def _strip_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]  # wall-clock fields


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock*"))
    return dst


def test_manifest_names_a_damaged_file_and_resume_falls_back(finished_run, tmp_path):
    run = _copy_run(finished_run[0], tmp_path / "run")
    newest = run / "checkpoints" / "step_000006"
    checkpoint.verify(str(newest))
    manifest = json.loads((newest / "manifest.json").read_text())
    assert {"model.safetensors", "trainer_state.pt", "train_config.json"} <= set(manifest["files"])
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated copy
    with pytest.raises(CheckpointError, match="model.safetensors: 100 bytes, the manifest says"):
        checkpoint.verify(str(newest))
    with pytest.raises(CheckpointError, match="model.safetensors"):  # asked for by name: no silent substitute
        checkpoint.resolve(str(newest))
    with pytest.warns(UserWarning, match=r"step_000006.*resuming from .*step_000005"):
        assert checkpoint.resolve(str(run)) == str(run / "checkpoints" / "step_000005")
    state = run / "checkpoints" / "step_000005" / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte differs
    state.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="SHA-256 mismatch"):
        assert checkpoint.resolve(str(run)).endswith("step_000004")
    (run / "checkpoints" / "latest").write_text("step_000099")  # `latest` pointing nowhere
    with pytest.warns(UserWarning):
        assert checkpoint.resolve(str(run)).endswith("step_000004")


def test_resume_of_a_run_whose_newest_checkpoint_is_damaged_continues_from_the_previous(finished_run, tmp_path):
    run = _copy_run(finished_run[0], tmp_path / "run")
    w = run / "checkpoints" / "step_000006" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    res = _run(["train", "--resume", str(run)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step_000006/model.safetensors" in res.stderr and "resuming from" in res.stderr
    ref_w, ref_rows = _final(finished_run[0])
    got_w, got_rows = _final(run)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert _strip_time(got_rows) == _strip_time(ref_rows)


def test_missing_or_empty_checkpoints_are_errors(tmp_path):
    with pytest.raises(MissingFileError, match="no such file"):
        checkpoint.resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="no checkpoints"):
        checkpoint.resolve(str(tmp_path / "empty"))


def test_run_lock_is_exclusive_and_taken_over_after_a_kill(tmp_path):
    lock = checkpoint.RunLock(str(tmp_path))
    with pytest.raises(RunDirLocked, match=f"in use by pid {os.getpid()}"):
        checkpoint.RunLock(str(tmp_path))
    lock.release()
    checkpoint.RunLock(str(tmp_path)).release()
    # a holder killed with SIGKILL never releases: the kernel drops its lock and the next run takes over
    code = (f"import time; from l2t_ext.rl.checkpoint import RunLock; lock = RunLock({str(tmp_path)!r}); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirLocked, match=f"pid {holder.pid}"):
        checkpoint.RunLock(str(tmp_path))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    taken = checkpoint.RunLock(str(tmp_path))
    assert taken.previous is not None and str(holder.pid) in taken.previous
    taken.release()


def test_second_run_into_a_live_run_directory_fails_at_once(tmp_path):
    out = tmp_path / "busy"
    first = _l2t(TRAIN + ["--out", str(out), "--steps", "40"])
    try:
        deadline = time.time() + 120
        while not (out / ".lock.owner").exists():
            assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        t0 = time.time()
        second = _run(TRAIN + ["--out", str(out)], timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1] == (
            f"l2t: error: run directory {out} is in use by pid {first.pid} on {os.uname().nodename}; wait for it to "
            "finish, stop it, or pass another --out")
        assert time.time() - t0 < 60
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_point_then_resume_equals_uninterrupted(finished_run, tmp_path, seed):
    """Killed after its first checkpoint at a random time (seed 0: while a checkpoint is being written, as
    soon as its temporary directory appears), then resumed with ``--resume DIR`` alone."""
    ref_dir, duration = finished_run
    out = tmp_path / "killed"
    proc = _l2t(TRAIN + ["--out", str(out)])
    ckpts = out / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    if seed == 0:
        while proc.poll() is None and not any(p.name.startswith(".tmp_step_") for p in ckpts.iterdir()):
            time.sleep(0.001)
    else:
        time.sleep(random.Random(seed).uniform(0, duration / 2))
    killed_at = len(list(ckpts.glob("step_*")))
    proc.kill()
    proc.communicate()
    res = _run(["train", "--resume", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stderr
    ref_w, ref_rows = _final(ref_dir)
    got_w, got_rows = _final(out)
    assert ref_w.keys() == got_w.keys() and all(torch.equal(ref_w[k], got_w[k]) for k in ref_w), killed_at
    assert _strip_time(got_rows) == _strip_time(ref_rows)
    assert not any(p.name.startswith(".tmp_") for p in ckpts.iterdir())


def test_a_checkpoint_is_hashed_once_per_process_until_a_file_changes(finished_run, tmp_path, monkeypatch):
    """``l2t train --resume`` resolves the checkpoint in the CLI and again in the Trainer: the second
    verification must not read every byte again, but a file rewritten since must be hashed again."""
    run = _copy_run(finished_run[0], tmp_path / "run")
    ckpt = run / "checkpoints" / "step_000006"
    hashed = []
    real = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda p: hashed.append(p) or real(p))
    checkpoint.verify(str(ckpt))
    n = len(hashed)
    assert n >= 3
    checkpoint.resolve(str(ckpt))
    assert len(hashed) == n  # unchanged files: no second read
    state = ckpt / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        checkpoint.verify(str(ckpt))
