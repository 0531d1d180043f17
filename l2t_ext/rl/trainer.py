"""The L2T / GRPO / length-penalty training loop (paper Eq. 5, Algorithm 1; DESIGN.md section 5).

One training step, top to bottom (``Trainer.step``):
  1. sample ``prompts_per_step`` prompts and ``group_size`` rollouts each (HF ``generate``, or a colocated vLLM
     engine whose weights are re-synced after every update: ``rollout.py``);
  2. grade every rollout with the verifier: r_out in {0, 1};
  3. split responses into episodes at the marker token ids (``segment_episodes``);
  4. l2t: the dense process reward per episode (Jr probes + Fisher compression penalty), computed from the
     same forward that yields the rollouts' old log-probs; other methods: a plain no-grad forward;
  5. advantages: group-normalised outcome (grpo), outcome minus a group-normalised length term
     (length_penalty), outcome + alpha * process-supervised episode advantages (l2t); with ``ppo`` a value
     head and GAE over the same token rewards instead;
  6. PPO clipped update: ``ppo_epochs`` passes over the rollouts in micro-batches with gradient accumulation,
     optional k3 KL to the frozen initial policy, gradient clipping, AdamW, cosine schedule with warm-up;
     under ``torchrun`` the loss runs through DDP, which all-reduces the gradients on the last micro-batch
     (``no_sync`` before), so every rank takes the step a single process would take on the union of the
     ranks' rollouts;
  7. refresh the SVD bases on schedule; log one JSON line; checkpoint atomically on schedule.

Data parallel (``torchrun --nproc_per_node N -m l2t_ext.cli train ...``): every rank holds the whole model,
samples its own ``prompts_per_step`` prompts (a shared prompt stream, sliced by rank) with its own sampling
seed, scores them (the batch Fisher of the l2t penalty is each rank's own batch), and all ranks apply the same
all-reduced update; rank 0 logs and writes checkpoints (with every rank's RNG state).

What it simplifies: whole-model replicas (no FSDP/ZeRO sharding); one optimizer step per training step; the
vLLM backend is single-process only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist

from l2t_ext.reward import AnswerLikelihoodJr, DenseProcessReward, FisherTracker, Rollouts, segment_episodes
from l2t_ext.reward.fisher import position_ids_from_mask, token_logprobs
from l2t_ext.rl import advantages as adv_lib
from l2t_ext.rl import checkpoint
from l2t_ext.rl.config import TrainConfig
from l2t_ext.rl.loss import ppo_loss
from l2t_ext.rl.modeling import char_tokenizer, load_local, marker_ids, tiny_qwen2
from l2t_ext.rl.rollout import make_rollouts
from l2t_ext.tasks import arith, load_verifier

RANK = int(os.environ.get("RANK", "0"))


def log(*a):
    if RANK == 0:  # rank-aware printing, ready for torchrun
        print(*a, file=sys.stderr, flush=True)


class PromptSource:
    """Prompts with reference answers: the synthetic arithmetic task, or a {question, answer} file."""

    def __init__(self, cfg: TrainConfig, seed: int):
        self.rng = random.Random(seed)
        self.cfg = cfg
        if cfg.task == "arith":
            self.rows = None
        else:
            from l2t_ext.tasks.math import load_dataset

            self.rows = [{"prompt": r["question"] + "\n", "answer": r["answer"]} for r in load_dataset(cfg.task)]

    def sample(self, n: int) -> list[dict]:
        if self.rows is None:
            out = []
            for _ in range(n):
                p = arith.generate_problem(self.rng, self.rng.choice(list(self.cfg.tiers)))
                out.append({"prompt": p.prompt, "answer": p.answer, "tier": p.tier})
            return out
        return [self.rng.choice(self.rows) for _ in range(n)]


def init_distributed(device: str) -> tuple[int, int, torch.device | None]:
    """(rank, world size, device) under ``torchrun`` (WORLD_SIZE > 1): joins the process group (nccl on GPU,
    gloo on CPU) and pins cuda:LOCAL_RANK; (0, 1, None) for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


class Policy(torch.nn.Module):
    """The policy and its optional value head as one module: what the loss runs through (and DDP wraps)."""

    def __init__(self, model, value_head=None):
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(self, ids, am, values: bool = False):
        out = self.model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am),
                         output_hidden_states=values)
        lp = token_logprobs(out.logits, ids).float()  # (B, L): log pi(x_{t+1} | x_<=t) at t
        return lp, (self.value_head(out.hidden_states[-1]) if values else None)


class ValueHead(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.v = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.v.weight)
        torch.nn.init.zeros_(self.v.bias)

    def forward(self, h):
        return self.v(h.float()).squeeze(-1)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None, init_state: dict | None = None):
        """``init_state``: a model state_dict to start from (e.g. a shared warm start); skips ``sft_steps``."""
        self.cfg = cfg
        self.rank, self.world, dist_dev = init_distributed(cfg.device)
        random.seed(cfg.seed + self.rank)  # per-rank sampling streams; rank 0 of a single process = seed
        torch.manual_seed(cfg.seed + self.rank)
        dev = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = dist_dev or torch.device(dev)
        self.verify = load_verifier(cfg.verifier)
        # ---- model and tokenizer (a local directory via from_pretrained, or the tiny preset from a config)
        ckpt = checkpoint.resolve(resume) if resume else None
        if ckpt:
            self.model, self.tok = load_local(ckpt)
        elif cfg.model == "tiny":
            self.tok = char_tokenizer()
            self.model = tiny_qwen2(self.tok, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed)
        else:
            self.model, self.tok = load_local(cfg.model)
        self.model.to(self.device)
        self.marker_ids = marker_ids(self.tok, list(cfg.markers))
        self.cue_ids = self.tok.encode(cfg.answer_cue, add_special_tokens=False)
        self.ref_model = None
        if cfg.kl_coef > 0:
            import copy

            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.value_head = ValueHead(self.model.config.hidden_size).to(self.device) if cfg.ppo else None
        params = list(self.model.parameters()) + (list(self.value_head.parameters()) if self.value_head else [])
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = max(1, int(cfg.warmup_ratio * cfg.steps))
        cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm) * cosine(s))
        self.prompts = PromptSource(cfg, cfg.seed)  # the same stream on every rank; step() slices it by rank
        self.step_idx = 0
        self.tracker = self.reward = None
        if cfg.method == "l2t":
            self.tracker = FisherTracker(self.model, layers=cfg.layers, rank=cfg.rank, seed=cfg.seed,
                                         refresh_every=cfg.refresh_every)
            self.reward = DenseProcessReward(AnswerLikelihoodJr(self.model, self.cue_ids, self.tok.pad_token_id),
                                             self.tracker, alpha=cfg.alpha, beta=cfg.beta,
                                             penalty_mode=cfg.penalty_mode, damping=cfg.damping,
                                             fisher_decay=cfg.fisher_decay)
        if ckpt:
            self._restore(ckpt)
        elif init_state is not None:
            self.model.load_state_dict(init_state)
            if self.tracker is not None:
                self.tracker.refresh()
        elif cfg.sft_steps > 0:
            from l2t_ext.rl.sft import warm_start

            warm_start(self.model, self.tok, cfg.sft_steps, cfg.sft_lr, cfg.sft_batch, cfg.tiers, cfg.seed,
                       self.device, log=log)
            if self.tracker is not None:
                self.tracker.refresh()
        self.policy = Policy(self.model, self.value_head)
        self.ref_policy = Policy(self.ref_model) if self.ref_model is not None else None
        self.ddp = None
        if self.world > 1:  # DDP broadcasts rank 0's weights: identical replicas whatever each rank loaded
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.policy, device_ids=[self.device.index] if self.device.type ==
                                               "cuda" else None, broadcast_buffers=False)
            if self.tracker is not None and not ckpt:  # bases of the broadcast weights (a resume keeps its own)
                self.tracker.refresh()
        if self.rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                f.write(cfg.to_json())
        self.rollouts = make_rollouts(cfg.rollout_backend, self.model, self.tok, cfg.out, cfg.seed, self.world,
                                      cfg.vllm_gpu_memory_utilization, "bfloat16" if cfg.bf16 else "float32")
        log(f"rollouts: {type(self.rollouts).__name__}" + (f"; data parallel over {self.world} ranks"
                                                           if self.world > 1 else ""))

    # ------------------------------------------------------------------------------------ one step
    def autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self) -> dict:
        cfg, t0 = self.cfg, time.time()
        G = cfg.group_size
        # 1. rollouts (this rank's slice of the shared prompt stream)
        P = cfg.prompts_per_step
        probs = self.prompts.sample(P * self.world)[self.rank * P:(self.rank + 1) * P]
        self.model.eval()
        with self.autocast():
            rb = self.rollouts.generate([p["prompt"] for p in probs], G, cfg.max_new_tokens, cfg.temperature,
                                        cfg.top_p)
        answers = [p["answer"] for p in probs for _ in range(G)]
        # 2. outcome reward
        r_out = torch.tensor([float(self.verify(c, a)) for c, a in zip(rb.completions, answers)],
                             device=self.device)
        # 3. episodes (token ids, never re-tokenised text)
        ep = segment_episodes(rb.input_ids, rb.response_mask, self.marker_ids, cfg.max_episodes)
        resp = rb.response_mask
        # position t predicts token t+1: the loss mask and advantages live on the predicting positions
        pred_mask = torch.zeros_like(resp)
        pred_mask[:, :-1] = resp[:, 1:]
        ep_pred = torch.full_like(ep, -1)
        ep_pred[:, :-1] = ep[:, 1:]
        lengths = resp.sum(1).to(torch.float32)
        # 4. dense process reward (l2t) and the old log-probs from the same forward
        stats = {"penalty_mean": 0.0, "jr_gain_mean": 0.0}
        r_prg = valid = None
        with self.autocast():
            if self.reward is not None:
                ro = Rollouts(rb.input_ids, rb.attention_mask, resp, ep,
                              answer_ids=[self.tok.encode(a, add_special_tokens=False) for a in answers])
                out = self.reward(ro)
                r_prg, valid, old_lp = out.r_prg.float(), out.valid, out.token_logprobs.float()
                if bool(valid.any()):
                    stats["penalty_mean"] = float(out.penalty[valid].mean())
                    stats["jr_gain_mean"] = float(out.jr_gain[valid].mean())
            else:
                old_lp = self._logprobs(rb.input_ids, rb.attention_mask, grad=False)[0]
            ref_lp = self._logprobs(rb.input_ids, rb.attention_mask, grad=False, ref=True)[0] \
                if self.ref_model is not None else None
        # 5. advantages
        if cfg.method == "length_penalty":
            seq_r = adv_lib.length_penalized(r_out, lengths, G, cfg.length_coef)
        else:
            seq_r = r_out
        if cfg.ppo:
            tok_r = self._token_rewards(seq_r, r_prg, valid, ep_pred, pred_mask)
            with torch.no_grad(), self.autocast():
                values = self._logprobs(rb.input_ids, rb.attention_mask, grad=False, values=True)[1]
            adv, returns = adv_lib.gae(tok_r, values, pred_mask, cfg.gamma, cfg.lam)
        else:
            adv = adv_lib.group_normalize(seq_r, G)[:, None].expand_as(old_lp) * pred_mask
            if cfg.method == "l2t":
                adv = adv + cfg.alpha * adv_lib.process_token_advantages(r_prg, valid, ep_pred, G,
                                                                             norm=cfg.process_norm)
            returns = None
        # 6. PPO update
        loss_val, clip_fracs, kls = self._update(rb, old_lp, ref_lp, adv, returns, pred_mask)
        self.rollouts.mark_stale()  # a vLLM engine re-syncs its weights before the next generation
        if self.tracker is not None and self.tracker.step():
            log(f"step {self.step_idx + 1}: refreshed SVD bases")
        self.step_idx += 1
        # 7. metrics (means over ranks; the loss terms are already shares of the global loss)
        n_eps = (ep.max(1).values + 1).float()
        m = {"accuracy": float(r_out.mean()), "reward_mean": float(seq_r.mean()),
             "response_tokens_mean": float(lengths.mean()), "episodes_mean": float(n_eps.mean()),
             "kl": sum(kls) / len(kls), "clip_frac": sum(clip_fracs) / len(clip_fracs), **stats}
        if self.world > 1:
            vals = self._all_sum(torch.tensor(list(m.values()) + [loss_val], dtype=torch.float64))
            m = {k: float(v) / self.world for k, v in zip(m, vals[:-1])}
            loss_val = float(vals[-1])
        return {"step": self.step_idx, **m, "loss": loss_val, "lr": self.sched.get_last_lr()[0],
                "time_s": time.time() - t0}

    def _all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity for a single process); CPU tensors travel through the device for nccl."""
        if self.world == 1:
            return x
        y = x.to(self.device)
        dist.all_reduce(y)
        return y.to(x.device)

    def _logprobs(self, ids, am, grad: bool, ref: bool = False, values: bool = False):
        """(token log-probs (B, L), values (B, L) or None); with ``grad`` through DDP under torchrun."""
        if ref:
            fn = self.ref_policy
        else:
            fn = self.ddp if (grad and self.ddp is not None) else self.policy
        with contextlib.nullcontext() if grad else torch.no_grad():
            return fn(ids, am, values)

    def _token_rewards(self, seq_r, r_prg, valid, ep_pred, pred_mask):
        """PPO token rewards: the sequence reward on the last response token, alpha * r_prg[k] on each
        episode's last token (l2t)."""
        B, L = pred_mask.shape
        tok_r = torch.zeros(B, L, device=pred_mask.device)
        last = (pred_mask.long() * torch.arange(L, device=pred_mask.device)).max(1).values
        tok_r[torch.arange(B), last] = seq_r.float()
        if r_prg is not None:
            for k in range(r_prg.shape[1]):
                pos = torch.where(ep_pred == k, torch.arange(L, device=pred_mask.device), -1).max(1).values
                ok = (pos >= 0) & valid[:, k]
                tok_r[torch.arange(B)[ok], pos[ok]] += self.cfg.alpha * r_prg[ok, k]
        return tok_r

    def _update(self, rb, old_lp, ref_lp, adv, returns, mask):
        cfg = self.cfg
        self.model.train()
        B = rb.input_ids.shape[0]
        total_tok = self._all_sum(mask.sum().float()).clamp(min=1)  # the global token count across ranks
        loss_sum, clip_fracs, kls = 0.0, [], []
        starts = list(range(0, B, cfg.micro_batch))
        for _ in range(cfg.ppo_epochs):
            self.opt.zero_grad(set_to_none=True)
            for s in starts:
                sl = slice(s, s + cfg.micro_batch)
                # DDP: accumulate locally, all-reduce once with the last micro-batch's backward
                sync = self.ddp is None or s == starts[-1]
                with contextlib.nullcontext() if sync else self.ddp.no_sync():
                    with self.autocast():
                        lp, v = self._logprobs(rb.input_ids[sl], rb.attention_mask[sl], grad=True, values=cfg.ppo)
                        loss, st = ppo_loss(lp, old_lp[sl], adv[sl], mask[sl], cfg.clip_eps_low, cfg.clip_eps_high,
                                            cfg.loss_agg, None if ref_lp is None else ref_lp[sl], cfg.kl_coef)
                        # micro-batch share of the step's token-mean / sequence-mean
                        w = mask[sl].sum() / total_tok if cfg.loss_agg == "token-mean" else \
                            (lp.shape[0] / (B * self.world))
                        loss = loss * w
                        if cfg.ppo:
                            m = mask[sl].float()
                            loss = loss + cfg.vf_coef * w * ((v - returns[sl]) ** 2 * m).sum() / m.sum().clamp(min=1)
                    if bool(self._all_sum((~torch.isfinite(loss.detach())).float()) > 0):  # all ranks stop together
                        raise FloatingPointError(f"non-finite loss at step {self.step_idx + 1}; stopping (the last "
                                                 f"good checkpoint in {cfg.out}/checkpoints is kept)")
                    # w is this micro-batch's share of the global loss; DDP averages over ranks, hence * world
                    (loss * self.world).backward()
                loss_sum += float(loss.detach())
                clip_fracs.append(st["clip_frac"])
                kls.append(st["kl"])
            params = [p for g in self.opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.opt.step()
        self.sched.step()
        self.model.eval()
        return loss_sum / cfg.ppo_epochs, clip_fracs, kls

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self) -> str | None:
        """Collective under torchrun (gathers every rank's RNG state); rank 0 writes."""
        rngs = [checkpoint.rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, checkpoint.rng_state())
        path = self._write_checkpoint(rngs) if self.rank == 0 else None
        if self.world > 1:
            dist.barrier()
        return path

    def _write_checkpoint(self, rngs: list[dict]) -> str:
        tensors = {}
        if self.tracker is not None:
            for n, (U, V) in self.tracker.bases.items():
                tensors[f"bases.{n}.U"], tensors[f"bases.{n}.V"] = U, V
        if self.value_head is not None:
            for n, p in self.value_head.state_dict().items():
                tensors[f"value_head.{n}"] = p
        if self.reward is not None and self.reward.fisher is not None:
            tensors["fisher"] = self.reward.fisher
        state = {"step": self.step_idx, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "rng": rngs[0], "rng_per_rank": rngs, "prompt_rng": self.prompts.rng.getstate(),
                 "tracker_steps": self.tracker._steps if self.tracker else 0, "config": self.cfg.to_json()}
        return checkpoint.save(self.cfg.out, self.step_idx, self.model, self.tok, state, tensors)

    def _restore(self, ckpt: str) -> None:
        state, extra = checkpoint.load_state(ckpt)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step_idx = state["step"]
        self.prompts.rng.setstate(state["prompt_rng"])
        if self.tracker is not None:
            self.tracker._steps = state["tracker_steps"]
            for n in self.tracker.layer_names:
                self.tracker.bases[n] = (extra[f"bases.{n}.U"].to(self.device), extra[f"bases.{n}.V"].to(self.device))
        if self.value_head is not None:
            self.value_head.load_state_dict({k[len("value_head."):]: v for k, v in extra.items()
                                             if k.startswith("value_head.")})
        if self.reward is not None and "fisher" in extra:
            self.reward.fisher = extra["fisher"].to(self.device)
        rngs = state.get("rng_per_rank", [state["rng"]])
        if len(rngs) == self.world:
            checkpoint.set_rng_state(rngs[self.rank])
        else:  # another world size: the run continues, but not bitwise like an uninterrupted one
            random.seed(self.cfg.seed + self.rank + self.step_idx)
            torch.manual_seed(self.cfg.seed + self.rank + self.step_idx)
            log(f"resume: checkpoint written by {len(rngs)} rank(s), now {self.world}; sampling RNGs re-seeded")
        log(f"resumed from {ckpt} at step {self.step_idx}")

    # ------------------------------------------------------------------------------------ the run
    def train(self, stop_at: int | None = None) -> list[dict]:
        """Run until ``cfg.steps`` (or ``stop_at``, for a deliberate early stop); returns the metric rows."""
        cfg = self.cfg
        last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        rows = []
        bar = _progress(cfg.steps, self.step_idx)
        with open(metrics_path, "a") if self.rank == 0 else contextlib.nullcontext() as f:
            while self.step_idx < last:
                m = self.step()
                rows.append(m)
                if f is not None:
                    f.write(json.dumps(m) + "\n")
                    f.flush()
                bar(m)
                if self.step_idx % cfg.save_every == 0 or self.step_idx == last:
                    self.save()
        return rows


def _progress(total: int, start: int):
    """A tqdm bar on a terminal (main rank only), silent otherwise."""
    if RANK != 0 or not sys.stderr.isatty():
        return lambda m: None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc="l2t train", dynamic_ncols=True)

    def update(m):
        bar.update(1)
        bar.set_postfix(acc=f"{m['accuracy']:.2f}", tok=f"{m['response_tokens_mean']:.0f}", loss=f"{m['loss']:.3f}")
    return update
