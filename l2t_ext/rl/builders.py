"""What a ``Trainer`` is made of, one small builder each: the process group, the model and tokenizer, the
optimizer with its schedule, the dense process reward. Every builder reads its knobs from ``TrainConfig``."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

from l2t_ext.lm import load_local, marker_ids, tiny_qwen2
from l2t_ext.reward import AnswerLikelihoodJr, DenseProcessReward, FisherTracker
from l2t_ext.rl.config import PENALTY_KIND, TrainConfig
from l2t_ext.tasks import arith


def build_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under ``torchrun`` (WORLD_SIZE > 1) joins the process group (nccl on GPU,
    gloo on CPU) and pins cuda:LOCAL_RANK; a single process gets rank 0 of 1 on ``device`` ("auto": cuda if
    available)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device(device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a (n, ...) tensor over the process group's ranks in rank order (n may differ per rank);
    collective. Used so that the reward's batch Fisher is one Fisher over every rank's episodes."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    rows = int(max(s.item() for s in sizes))
    padded = torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def close_distributed() -> None:
    """Leave the process group (a no-op without one). Every rank must call it: the barrier keeps a fast rank from
    tearing down its gloo/nccl threads while a peer still talks to it, and destroying the group before the
    interpreter exits stops the C++ destructors from running with live communication threads (with gloo that
    aborted rank 0 with ``terminate called without an active exception`` in about 1 run in 40)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int = 0) -> NoReturn:
    """End this process with ``code``; the last line of a script that may run under ``torchrun`` or ``accelerate
    launch``. On success it first leaves the process group with every peer (``close_distributed``); a failing rank
    exits at once rather than wait in a barrier its peers may never reach. With several processes
    (``WORLD_SIZE > 1``) it skips the interpreter's finalisation: gloo's C++ threads can still hold objects with
    Python references then, and tearing them down aborted a finished rank (SIGABRT, "terminate called without an
    active exception") in a few runs in a hundred."""
    if code == 0:
        close_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def build_model(cfg: TrainConfig, checkpoint_dir: str | None = None):
    """(model, tokenizer): a checkpoint's weights, the tiny preset model built from a config (``model: tiny``,
    randomly initialised from ``seed``, with the arithmetic task's character tokenizer), or a local Hugging Face
    directory."""
    if checkpoint_dir:
        return load_local(checkpoint_dir)
    if cfg.model == "tiny":
        tok = arith.tokenizer()
        return tiny_qwen2(tok, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed), tok
    return load_local(cfg.model)


def build_optimizer(cfg: TrainConfig, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and ``transformers.get_cosine_schedule_with_warmup``: a linear warm-up over ``warmup_ratio`` of the
    steps (from 0), then a cosine decay to 0."""
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, get_cosine_schedule_with_warmup(opt, max(1, int(cfg.warmup_ratio * cfg.steps)), cfg.steps)


def resolve_task_defaults(cfg: TrainConfig, task) -> TrainConfig:
    """``cfg`` with its ``auto`` verifier, answer cue and instruction replaced by the task's (saved with the run,
    so a resumed or evaluated run uses the same)."""
    return dataclasses.replace(
        cfg, verifier=task.default_verifier if cfg.verifier == "auto" else cfg.verifier,
        answer_cue=task.default_cue if cfg.answer_cue == "auto" else cfg.answer_cue,
        instruction=task.default_instruction(cfg.markers[0]) if cfg.instruction == "auto" else cfg.instruction)


def build_reward(cfg: TrainConfig, model, tokenizer, gather=None) -> DenseProcessReward | None:
    """The dense process reward over ``model``'s final weights (method l2t), else None. The tracker computes
    its SVD bases here, once: build it after the weights are final (warm start, broadcast)."""
    if cfg.method not in PENALTY_KIND:
        return None
    tracker = FisherTracker(model, layers=cfg.layers, rank=cfg.rank, seed=cfg.seed, refresh_every=cfg.refresh_every)
    jr = AnswerLikelihoodJr(model, tokenizer.encode(cfg.answer_cue, add_special_tokens=False), tokenizer.pad_token_id)
    return DenseProcessReward(jr, tracker, alpha=cfg.alpha, beta=cfg.beta, penalty_mode=cfg.penalty_mode,
                              damping=cfg.damping, fisher_decay=cfg.fisher_decay, normalize=cfg.penalty_norm,
                              penalty_kind=PENALTY_KIND[cfg.method], micro_batch=cfg.reward_micro_batch or None,
                              gather=gather, probes=cfg.reward_probes)


def episode_markers(cfg: TrainConfig, tokenizer) -> list[str]:
    """The configured episode markers (text markers: modes, literals, ``re:`` regexes), after checking that the
    tokenizer can write every one that has a text (an error names a marker it cannot represent)."""
    from l2t_ext.lm.markers import marker_text

    marker_ids(tokenizer, [marker_text(m) for m in cfg.markers if not m.startswith("re:")])
    return list(cfg.markers)
