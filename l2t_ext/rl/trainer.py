"""The L2T / GRPO / length-penalty training loop (paper Eq. 5, Algorithm 1; docs/architecture.md).

One training step is two calls, ``batch = trainer.collect(problems)`` then ``trainer.update(batch)``:

``collect`` (no parameter changes) returns a ``ScoredBatch``:
  1. ``group_size`` rollouts per problem (HF ``generate``, or a colocated vLLM engine: ``rollout.py``);
  2. the outcome reward r_out in {0, 1} from the verifier;
  3. episodes: responses split where a marker matches their decoded text (``segment_episodes``);
  4. l2t: the dense process reward per episode (Jr probes + Fisher compression penalty), from the same forward
     that yields the rollouts' old log-probs; other methods: a plain no-grad forward; the frozen reference's
     log-probs when ``kl_coef > 0``;
  5. advantages: group-normalised outcome (grpo), outcome minus a group-normalised length term
     (length_penalty), outcome + alpha * process-supervised episode advantages (l2t); with ``ppo`` a value
     head and GAE over the same token rewards instead.
``update`` is the PPO clipped update: ``ppo_epochs`` passes over the rollouts in micro-batches with gradient
accumulation, optional k3 KL, gradient clipping, AdamW and the LR schedule, then the SVD bases' refresh on
schedule. ``step`` is those two calls and a metrics row; ``train`` runs steps, logs, evaluates and checkpoints.

Data parallel (``torchrun --nproc_per_node N -m l2t_ext.cli train ...``): every rank holds the whole model,
samples its slice of a shared prompt stream with its own sampling seed and scores it (the l2t penalty's batch
Fisher is the rank's own batch); the loss runs through DDP, which all-reduces gradients on the last
micro-batch (``no_sync`` before), so every rank takes the step a single process would take on the union of the
ranks' rollouts. Rank 0 logs and writes checkpoints (with every rank's RNG state).

Fully sharded (``--parallel fsdp``, ``sharding.py``): the same data flow, but the weights, gradients and AdamW
moments are sharded per transformer block (FSDP2). ``collect`` runs on the gathered weights (one all-gather per
step), the update on the shards (gradients reduce-scattered after every micro-batch, so they stay sharded), the
SVD refresh gathers only the tracked weights, and checkpoints add the sharded state
through ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import random
import shutil
import sys
import time
import warnings

import torch
import torch.distributed as dist

from l2t_ext.errors import InputError
from l2t_ext.lm import check_model_dir, render_prompt
from l2t_ext.reward import DenseProcessReward, RewardOutput, Rollouts, segment_episodes
from l2t_ext.rl import advantages as adv_lib
from l2t_ext.rl import checkpoint, sharding
from l2t_ext.rl.builders import (
    build_distributed,
    build_model,
    build_optimizer,
    build_reward,
    close_distributed,
    episode_markers,
    gather_rows,
    resolve_task_defaults,
)
from l2t_ext.rl.config import TrainConfig
from l2t_ext.rl.loss import ppo_loss
from l2t_ext.rl.policy import Policy, ValueHead
from l2t_ext.rl.rollout import make_rollouts
from l2t_ext.tasks import load_task, load_verifier

RANK = int(os.environ.get("RANK", "0"))


def log(*a):
    if RANK == 0:  # rank-aware printing, ready for torchrun
        print(*a, file=sys.stderr, flush=True)


@dataclasses.dataclass
class ScoredBatch:
    """One step's rollouts with everything the update needs. Tensors are (B, L) unless noted; B = problems x
    group_size, group-major. ``loss_mask``, ``episode_ids_pred``, the log-probs and the advantages live on the
    predicting positions (position t predicts token t+1)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # bool: generated tokens (with <eos>)
    completions: list[str]  # decoded responses
    answers: list[str]  # the reference answer of each row
    episode_ids: torch.Tensor  # episode of each response token, -1 elsewhere
    episode_ids_pred: torch.Tensor  # episode of the token each position predicts
    loss_mask: torch.Tensor  # bool: positions that predict a response token
    outcome: torch.Tensor  # (B,) r_out in {0, 1}
    sequence_reward: torch.Tensor  # (B,) r_out, or r_out minus the length term (length_penalty)
    old_logprobs: torch.Tensor  # log-probs under the sampling policy
    ref_logprobs: torch.Tensor | None  # log-probs under the frozen reference (kl_coef > 0)
    reward: RewardOutput | None  # l2t: per-episode parts (B, K): r_prg, valid, jr gain, penalty, ...
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None  # ppo: value targets
    # seconds of generation and of scoring (the l2t reward, or the other methods' old-log-prob forward)
    phase_s: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1).to(torch.float32)


class Trainer:
    """``Trainer(cfg)`` builds a run (fresh, from ``init_state`` weights, or continued from the checkpoint in
    ``resume``); ``train()`` runs it."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, init_state: dict | None = None):
        self.cfg = cfg
        self.rank, self.world, self.device = build_distributed(cfg.device)
        self.fsdp = cfg.parallel == "fsdp"
        if self.fsdp and self.world == 1:
            raise InputError("parallel=fsdp shards the model over the ranks of a distributed launch; run it under "
                             "torchrun --nproc_per_node N (N >= 2), or use the default parallel=ddp")
        # inputs are checked before anything is written or trained: the task's rows, the verifier, the model files
        self.task = load_task(cfg.task, cfg.tiers)
        cfg = self.cfg = resolve_task_defaults(cfg, self.task)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.sft_steps > 0 and not resume and init_state is None and not self.task.has_traces:
            raise InputError(f"task {cfg.task!r} has no reference traces for a supervised warm start; "
                             "set --sft_steps 0")
        self.verify = load_verifier(cfg.verifier)
        if cfg.model != "tiny" and not resume:
            check_model_dir(cfg.model)
        # rank 0 writes the run directory: lock it before anything is written (or a checkpoint is chosen)
        self.run_lock = checkpoint.RunLock(cfg.out) if self.rank == 0 else None
        if self.run_lock is not None and self.run_lock.previous:
            log(f"{cfg.out}: taking over the lock of a run that ended without releasing it ({self.run_lock.previous})")
        random.seed(cfg.seed + self.rank)  # per-rank sampling streams; rank 0 of a single process = seed
        torch.manual_seed(cfg.seed + self.rank)
        ckpt = checkpoint.resolve(resume) if resume else None
        self.model, self.tok = build_model(cfg, ckpt)
        self.model.to(self.device)
        self.markers = episode_markers(cfg, self.tok)
        self.value_head = ValueHead(self.model.config.hidden_size).to(self.device) if cfg.ppo else None
        if not ckpt:
            self._init_weights(init_state)
        # everything below sees the final starting weights
        self.ref_policy = Policy(copy.deepcopy(self.model).eval().requires_grad_(False)) if cfg.kl_coef > 0 else None
        self.policy = Policy(self.model, self.value_head)
        self._parallelize()
        # under torchrun one Fisher (and one penalty scale) covers every rank's episodes
        self.reward: DenseProcessReward | None = build_reward(cfg, self.model, self.tok,
                                                              gather=gather_rows if self.world > 1 else None)
        self.prompt_rng = random.Random(cfg.seed)  # the same stream on every rank; next_problems slices it
        self.step_idx = 0
        if ckpt:
            self._restore(ckpt)
        if self.rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                f.write(cfg.to_json())
        self.rollouts = make_rollouts(cfg.rollout_backend, self.model, self.tok, cfg.out, cfg.seed, self.world,
                                      cfg.vllm_gpu_memory_utilization, "bfloat16" if cfg.bf16 else "float32")
        log(f"rollouts: {type(self.rollouts).__name__}" + (f"; data parallel over {self.world} ranks"
                                                           if self.world > 1 else ""))

    def _parallelize(self) -> None:
        """The optimizer, with the model sharded first (fsdp: the optimizer then holds sharded moments) or wrapped
        in DDP after (which broadcasts rank 0's weights: identical replicas whatever each rank loaded)."""
        cfg = self.cfg
        if self.fsdp:  # rank 0's weights, then shards
            sharding.broadcast_from_rank0(self.policy)
            sharding.shard(self.model, self.value_head)
            if self.ref_policy is not None:
                sharding.broadcast_from_rank0(self.ref_policy)
                sharding.shard(self.ref_policy.model)
        self.opt, self.sched = build_optimizer(cfg, list(self.policy.parameters()))
        self.ddp = None
        if self.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.policy, device_ids=ids, broadcast_buffers=False)

    def _init_weights(self, init_state: dict | None) -> None:
        """Start from ``init_state`` (e.g. a shared warm start), or run the task's supervised warm start."""
        if init_state is not None:
            self.model.load_state_dict(init_state)
        elif self.cfg.sft_steps > 0:
            from l2t_ext.lm.sft import warm_start

            cfg = self.cfg
            warm_start(self.model, self.tok, self.task.sft_pairs, cfg.sft_steps, cfg.sft_lr, cfg.sft_batch, cfg.seed,
                       self.device, log=log)

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------ one step
    def step(self) -> dict:
        """One training step: collect, update, and the metrics row (with this rank's time per phase and, on a GPU,
        its peak memory)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = self._clock()
        batch = self.collect(self.next_problems())
        t1 = self._clock()
        stats = self.update(batch)
        t2 = self._clock()
        m = self._metrics(batch, stats)
        self._check_episode_health(m)
        row = {"step": self.step_idx, **m, "lr": self.sched.get_last_lr()[0], "time_s": self._clock() - t0,
               **batch.phase_s, "time_update_s": t2 - t1}
        if self.device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return row

    def _clock(self) -> float:
        """Seconds, read after the GPU has finished the work queued so far (phase times, not launch times)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _check_episode_health(self, m: dict) -> None:
        """Warn once when most rollouts are one episode: L2T's process reward then reduces to an outcome reward."""
        if self.reward is None or m["single_episode_share"] <= 0.5 or getattr(self, "_warned_episodes", False):
            return
        self._warned_episodes = True
        if self.rank == 0:
            warnings.warn(
                f"step {self.step_idx}: {m['single_episode_share']:.0%} of the rollouts have a single episode (markers "
                f"{self.cfg.markers} found nothing in them), so L2T's process reward degrades to an outcome reward. "
                "Pick a marker the model writes (--markers paragraph, line or sentence), prompt for steps in that "
                "format (--instruction), or warm start on traces that use it.", stacklevel=2)

    def prompted(self, problems: list[dict]) -> list[dict]:
        """``problems`` with each question rendered as the model's prompt (instruction, chat template)."""
        return [{**p, "prompt": render_prompt(self.tok, p["prompt"], self.cfg.instruction, self.cfg.chat_template)}
                for p in problems]

    def next_problems(self) -> list[dict]:
        """This rank's ``prompts_per_step`` problems: its slice of the stream shared by all ranks."""
        n = self.cfg.prompts_per_step
        return self.task.sample(self.prompt_rng, n * self.world)[self.rank * n:(self.rank + 1) * n]

    def collect(self, problems: list[dict]) -> ScoredBatch:
        """Rollouts of ``problems``, graded, segmented, scored and turned into advantages (no update)."""
        with sharding.gathered(self.policy, self.ref_policy):  # fsdp: ranks' forwards differ in number
            return self._collect(problems)

    def _collect(self, problems: list[dict]) -> ScoredBatch:
        cfg = self.cfg
        self.model.eval()
        t0 = self._clock()
        with self.autocast():
            prompts = [p["prompt"] for p in self.prompted(problems)]
            ro = self.rollouts.generate(prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
        t1 = self._clock()
        answers = [p["answer"] for p in problems for _ in range(cfg.group_size)]
        outcome = torch.tensor([float(self.verify(c, a)) for c, a in zip(ro.completions, answers)], device=self.device)
        episode_ids = segment_episodes(ro.input_ids, ro.response_mask, self.markers, tokenizer=self.tok,
                                       max_episodes=cfg.max_episodes)
        loss_mask = torch.zeros_like(ro.response_mask)
        loss_mask[:, :-1] = ro.response_mask[:, 1:]
        episode_ids_pred = torch.full_like(episode_ids, -1)
        episode_ids_pred[:, :-1] = episode_ids[:, 1:]
        t_score = self._clock()
        with self.autocast():
            old_logprobs, reward = self._score(ro, episode_ids, answers)
            phase_s = {"time_rollout_s": t1 - t0, "time_score_s": self._clock() - t_score}
            ref_logprobs = None
            if self.ref_policy is not None:
                with torch.no_grad():
                    ref_logprobs = self.ref_policy(ro.input_ids, ro.attention_mask)[0]
        seq_reward = outcome
        if cfg.method in ("length_penalty", "length_penalty_gated"):
            seq_reward = adv_lib.length_penalized(outcome, ro.response_mask.sum(1).to(torch.float32), cfg.group_size,
                                                  cfg.length_coef, gated=cfg.method == "length_penalty_gated")
        batch = ScoredBatch(ro.input_ids, ro.attention_mask, ro.response_mask, ro.completions, answers, episode_ids,
                            episode_ids_pred, loss_mask, outcome, seq_reward, old_logprobs, ref_logprobs, reward,
                            phase_s=phase_s)
        batch.advantages, batch.returns = self._advantages(batch)
        return batch

    def _score(self, ro, episode_ids, answers) -> tuple[torch.Tensor, RewardOutput | None]:
        """(old log-probs, l2t reward parts or None): the reward's forward yields the log-probs too."""
        if self.reward is None:
            with torch.no_grad():
                return self.policy(ro.input_ids, ro.attention_mask)[0], None
        answer_ids = [self.tok.encode(self.task.answer_prefix + a, add_special_tokens=False) for a in answers]
        out = self.reward(Rollouts(ro.input_ids, ro.attention_mask, ro.response_mask, episode_ids,
                                   answer_ids=answer_ids))
        return out.token_logprobs.float(), out

    def _advantages(self, b: ScoredBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(advantages, returns or None) on the predicting positions."""
        cfg = self.cfg
        r_prg = b.reward.r_prg.float() if b.reward is not None else None
        valid = b.reward.valid if b.reward is not None else None
        if cfg.ppo:
            rewards = adv_lib.token_rewards(b.sequence_reward, r_prg, valid, b.episode_ids_pred, b.loss_mask, cfg.alpha)
            with torch.no_grad(), self.autocast():
                values = self.policy(b.input_ids, b.attention_mask, values=True)[1]
            return adv_lib.gae(rewards, values, b.loss_mask, cfg.gamma, cfg.lam)
        adv = adv_lib.group_normalize(b.sequence_reward, cfg.group_size)[:, None].expand_as(b.old_logprobs)
        adv = adv * b.loss_mask
        if r_prg is not None:
            adv = adv + cfg.alpha * adv_lib.process_token_advantages(r_prg, valid, b.episode_ids_pred, cfg.group_size,
                                                                     norm=cfg.process_norm)
        return adv, None

    def update(self, batch: ScoredBatch) -> dict:
        """PPO-clip update on ``batch``; returns {"loss", "kl", "clip_frac"}. Advances the step counter."""
        cfg = self.cfg
        self.model.train()
        total_tokens = self._all_sum(batch.loss_mask.sum().float()).clamp(min=1)  # global token count
        starts = list(range(0, batch.input_ids.shape[0], cfg.micro_batch))
        loss_sum, clip_fracs, kls = 0.0, [], []
        for _ in range(cfg.ppo_epochs):
            self.opt.zero_grad(set_to_none=True)
            for s in starts:
                # DDP: accumulate locally, all-reduce once with the last micro-batch's backward. FSDP reduce-scatters
                # every micro-batch: its no-sync accumulation would hold full-size gradients on every rank
                sync = self.ddp is None or s == starts[-1]
                with contextlib.nullcontext() if sync else self.ddp.no_sync():
                    loss, st = self._micro_batch_loss(batch, slice(s, s + cfg.micro_batch), total_tokens)
                    # the loss is this micro-batch's share of the global loss; DDP/FSDP average over ranks: * world
                    (loss * self.world).backward()
                loss_sum += float(loss.detach())
                clip_fracs.append(st["clip_frac"])
                kls.append(st["kl"])
            torch.nn.utils.clip_grad_norm_(list(self.policy.parameters()), cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)  # no gradient memory held through the next rollouts
        self.sched.step()
        self.model.eval()
        self.rollouts.mark_stale()  # a vLLM engine re-syncs its weights before the next generation
        self.step_idx += 1
        if self.reward is not None and self.reward.tracker.step():
            log(f"step {self.step_idx}: refreshed SVD bases")
        return {"loss": loss_sum / cfg.ppo_epochs, "kl": sum(kls) / len(kls),
                "clip_frac": sum(clip_fracs) / len(clip_fracs)}

    def _micro_batch_loss(self, b: ScoredBatch, sl: slice, total_tokens: torch.Tensor):
        """(loss weighted by its share of the step's token-mean / sequence-mean, ppo_loss stats)."""
        cfg = self.cfg
        mask = b.loss_mask[sl]
        with self.autocast():
            lp, values = (self.ddp or self.policy)(b.input_ids[sl], b.attention_mask[sl], cfg.ppo)
            ref = None if b.ref_logprobs is None else b.ref_logprobs[sl]
            loss, st = ppo_loss(lp, b.old_logprobs[sl], b.advantages[sl], mask, cfg.clip_eps_low, cfg.clip_eps_high,
                                cfg.loss_agg, ref, cfg.kl_coef)
            w = mask.sum() / total_tokens if cfg.loss_agg == "token-mean" else \
                (lp.shape[0] / (b.input_ids.shape[0] * self.world))
            loss = loss * w
            if cfg.ppo:
                m = mask.float()
                loss = loss + cfg.vf_coef * w * ((values - b.returns[sl]) ** 2 * m).sum() / m.sum().clamp(min=1)
        if bool(self._all_sum((~torch.isfinite(loss.detach())).float()) > 0):  # all ranks stop together
            raise FloatingPointError(f"non-finite loss at step {self.step_idx + 1}; stopping (the last good "
                                     f"checkpoint in {cfg.out}/checkpoints is kept)")
        return loss, st

    def _metrics(self, b: ScoredBatch, stats: dict) -> dict:
        """The step's metrics row, averaged over ranks (the loss terms are already shares of the global loss)."""
        parts = {"penalty_mean": 0.0, "jr_gain_mean": 0.0}
        if b.reward is not None and bool(b.reward.valid.any()):
            parts = {"penalty_mean": float(b.reward.penalty[b.reward.valid].mean()),
                     "jr_gain_mean": float(b.reward.jr_gain[b.reward.valid].mean())}
        m = {"accuracy": float(b.outcome.mean()), "reward_mean": float(b.sequence_reward.mean()),
             "response_tokens_mean": float(b.response_lengths.mean()),
             "episodes_mean": float((b.episode_ids.max(1).values + 1).float().mean()),
             "single_episode_share": float((b.episode_ids.max(1).values == 0).float().mean()),
             "kl": stats["kl"], "clip_frac": stats["clip_frac"], **parts}
        loss = stats["loss"]
        if self.world > 1:
            vals = self._all_sum(torch.tensor(list(m.values()) + [loss], dtype=torch.float64))
            m = {k: float(v) / self.world for k, v in zip(m, vals[:-1])}
            loss = float(vals[-1])
        return {**m, "loss": loss}

    def _all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity for a single process); CPU tensors travel through the device for nccl."""
        if self.world == 1:
            return x
        y = x.to(self.device)
        dist.all_reduce(y)
        return y.to(x.device)

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self) -> str | None:
        """Collective under torchrun (gathers every rank's RNG state); rank 0 writes."""
        rngs = [checkpoint.rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, checkpoint.rng_state())
        path = sharded = model_state = None
        if self.fsdp:  # every rank writes its shards; rank 0 moves them into the checkpoint with the full weights
            sharded = os.path.join(self.cfg.out, "checkpoints", f".dcp_step_{self.step_idx:06d}")
            if self.rank == 0:
                shutil.rmtree(sharded, ignore_errors=True)
            dist.barrier()
            sharding.save_sharded(sharded, self.policy, self.opt if self.cfg.save_optimizer else None)
            model_state = sharding.full_model_state(self.model)
        if self.rank == 0:
            keep_opt = self.cfg.save_optimizer and not self.fsdp  # fsdp: the optimizer is in the sharded state
            state = {"step": self.step_idx, "optimizer": self.opt.state_dict() if keep_opt else None,
                     "scheduler": self.sched.state_dict(),
                     "rng_per_rank": rngs, "prompt_rng": self.prompt_rng.getstate(),
                     "reward": self.reward.state_dict() if self.reward is not None else None,
                     "value_head": self.value_head.state_dict() if self.value_head is not None and not self.fsdp
                     else None,
                     "config": self.cfg.to_json()}
            path = checkpoint.save(self.cfg.out, self.step_idx, self.model, self.tok, state, model_state=model_state,
                                   sharded_dir=sharded)
        if self.world > 1:
            dist.barrier()
        return path

    def _restore(self, ckpt: str) -> None:
        state = checkpoint.load_state(ckpt)
        sharded = os.path.join(ckpt, sharding.DCP_DIR)
        if self.fsdp and os.path.isdir(sharded):  # the weights (and moments) exactly as the shards held them
            restored = sharding.load_sharded(sharded, self.policy, self.opt)
        elif state["optimizer"] is not None and not self.fsdp:
            self.opt.load_state_dict(state["optimizer"])
            restored = True
        else:
            restored = False
        if not restored:
            log(f"resume: {ckpt} holds no optimizer state for parallel={self.cfg.parallel} (save_optimizer false, or "
                "written in the other parallel mode); the weights are restored, AdamW's moments start from zero")
        self.sched.load_state_dict(state["scheduler"])
        self.step_idx = state["step"]
        self.prompt_rng.setstate(state["prompt_rng"])
        if self.reward is not None:
            self.reward.load_state_dict(state["reward"])
        if self.value_head is not None and state["value_head"] is not None:
            self.value_head.load_state_dict(state["value_head"])
        rngs = state["rng_per_rank"]
        if len(rngs) == self.world:
            checkpoint.set_rng_state(rngs[self.rank])
        else:  # another world size: the run continues, but not bitwise like an uninterrupted one
            random.seed(self.cfg.seed + self.rank + self.step_idx)
            torch.manual_seed(self.cfg.seed + self.rank + self.step_idx)
            log(f"resume: checkpoint written by {len(rngs)} rank(s), now {self.world}; sampling RNGs re-seeded")
        if self.rank == 0:  # rows after the checkpoint's step are logged again by this run
            for name in ("metrics.jsonl", "evals.jsonl"):
                checkpoint.truncate_jsonl(os.path.join(self.cfg.out, name), self.step_idx)
        log(f"resumed from {ckpt} at step {self.step_idx}")

    # ------------------------------------------------------------------------------------ the run
    def evaluate(self, n_samples: int | None = None) -> dict:
        """``evaluate`` on the task's held-out problems (``eval_problems``, ``eval_samples``). Sampling runs on a
        forked RNG seeded from the step, so an evaluation never changes the training that follows it. Under fsdp
        call it inside ``sharding.gathered(trainer.policy)`` on every rank (``train`` does), or after ``close``."""
        from l2t_ext.eval import evaluate
        from l2t_ext.tasks import load_extractor

        cfg = self.cfg
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 1_000_003 * (self.step_idx + 1))
            problems = self.prompted(self.task.eval_problems(cfg.eval_problems, cfg.seed))
            return evaluate(self.model, self.tok, problems, self.verify,
                            load_extractor(cfg.verifier), n_samples=n_samples or cfg.eval_samples,
                            max_new_tokens=cfg.max_new_tokens, answer_cue=cfg.answer_cue, marker=cfg.markers[0])

    def train(self, stop_at: int | None = None) -> list[dict]:
        """Run until ``cfg.steps`` (or ``stop_at``, for a deliberate early stop); returns the metric rows.
        Every ``eval_every`` steps (0: never) rank 0 evaluates and appends a row to ``evals.jsonl``."""
        cfg = self.cfg
        last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        rows = []
        progress = Progress(cfg.steps, self.step_idx, cfg.log_every) if self.rank == 0 else None
        with open(os.path.join(cfg.out, "metrics.jsonl"), "a") if self.rank == 0 else contextlib.nullcontext() as f:
            while self.step_idx < last:
                m = self.step()
                rows.append(m)
                if f is not None:
                    f.write(json.dumps(m) + "\n")
                    f.flush()
                    progress.update(m)
                if self.step_idx % cfg.save_every == 0 or self.step_idx == last:
                    self.save()
                if cfg.eval_every and self.step_idx % cfg.eval_every == 0:
                    with sharding.gathered(self.policy):  # fsdp: rank 0 evaluates on the gathered weights
                        if self.rank == 0:
                            self._append_eval(self.evaluate())
        if progress is not None:
            progress.close()
        return rows

    def close(self) -> None:
        """Release the run directory's lock and, under torchrun, leave the process group (collective: every rank
        calls it once, after its last collective op). Evaluation still works afterwards (fsdp: the weights are
        gathered for good first)."""
        if self.run_lock is not None:
            self.run_lock.release()
        if self.fsdp:
            sharding.unshard(self.policy)
        if self.world > 1:
            close_distributed()

    def _append_eval(self, res: dict) -> None:
        row = {"step": self.step_idx, **res["overall"]}
        with open(os.path.join(self.cfg.out, "evals.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"eval at step {self.step_idx}: pass@1 {row['pass@1']:.3f}, tokens {row['response_tokens']:.1f}")


class Progress:
    """A tqdm bar on a terminal; without one, a plain line every ``every`` steps (step, accuracy, reward,
    tokens, seconds), so logs show progress too."""

    def __init__(self, total: int, start: int, every: int):
        self.every, self.bar = max(1, every), None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="l2t train", dynamic_ncols=True)
        self.total = total

    def update(self, m: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(acc=f"{m['accuracy']:.2f}", tok=f"{m['response_tokens_mean']:.0f}",
                                 loss=f"{m['loss']:.3f}")
        elif m["step"] % self.every == 0 or m["step"] == self.total:
            print(f"step {m['step']}/{self.total}: accuracy {m['accuracy']:.3f}, reward {m['reward_mean']:.3f}, "
                  f"tokens {m['response_tokens_mean']:.1f}, episodes {m['episodes_mean']:.2f}, loss {m['loss']:.4f}, "
                  f"{m['time_s']:.1f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
