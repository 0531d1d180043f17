"""L2T inside TRL's ``GRPOTrainer``: TRL generates, grades (its reward functions give the outcome), logs and
runs the loss under accelerate / DeepSpeed / FSDP; this subclass adds L2T's dense process reward to the
advantages it hands to TRL's loss.

Per step, on the rollouts TRL just generated: episodes are cut at ``l2t_markers`` in the decoded completions,
``DenseProcessReward`` (Jr probes of the reference answer in ``l2t_answer_column`` + the compression penalty,
with a ``FisherTracker`` on the unwrapped policy) scores every episode, and each completion token's advantage
becomes TRL's group-normalised outcome advantage + ``l2t_alpha`` x the suffix sum of its rollout's normalised
episode rewards: ``l2t_ext.rl.advantages``'s functions, the same as ``l2t train``. Group normalisation sees
whole groups: with several processes the episode rewards are gathered first (TRL may split a group across
processes), and the compression penalty uses one Fisher over every process's episodes (their proxy gradients are
all-gathered), so an episode's reward does not depend on how the batch was split. The tracker's SVD bases
refresh every ``l2t_refresh_every`` optimizer steps.

Under accelerate's FSDP2 the reward runs on the gathered weights (processes score different numbers of
episodes, so per-forward all-gathers would deadlock) and the SVD refresh gathers only the tracked weights.
DeepSpeed ZeRO-3 (parameters partitioned outside FSDP) is refused.

Supported: trl 1.16.x (``pip install 'l2t_ext[trl]'``); importing this module with another version raises.
"""

from __future__ import annotations

import dataclasses

import torch

from l2t_ext.errors import InputError

SUPPORTED_TRL = ((1, 16), (1, 17))  # [min, max) major.minor


def _check_trl():
    try:
        import trl
    except ImportError as e:
        raise ImportError("l2t_ext.integrations.trl needs TRL: pip install 'l2t_ext[trl]'") from e
    major, minor = (int(x) for x in trl.__version__.split(".")[:2])
    if not SUPPORTED_TRL[0] <= (major, minor) < SUPPORTED_TRL[1]:
        raise ImportError(f"l2t_ext.integrations.trl supports trl >= 1.16, < 1.17 (its private "
                          f"_generate_and_score_completions is overridden); found trl {trl.__version__}")
    return trl


_check_trl()
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from l2t_ext.reward import AnswerLikelihoodJr, DenseProcessReward, FisherTracker, Rollouts, segment_episodes  # noqa: E402
from l2t_ext.rl.advantages import episode_token_values, normalized_episode_rewards  # noqa: E402
from l2t_ext.rl.builders import gather_rows  # noqa: E402
from l2t_ext.rl.sharding import gathered  # noqa: E402


@dataclasses.dataclass
class L2TConfig(GRPOConfig):
    """``GRPOConfig`` plus L2T's knobs (the paper's defaults; see ``TrainConfig`` for their meaning)."""

    l2t_alpha: float = dataclasses.field(default=0.8, metadata={"help": "weight of the process advantage"})
    l2t_beta: float = dataclasses.field(default=0.6, metadata={"help": "weight of the compression penalty"})
    l2t_markers: list[str] = dataclasses.field(default_factory=lambda: ["paragraph"],
                                               metadata={"help": "episode markers (modes, literals, re:regex)"})
    l2t_max_episodes: int = dataclasses.field(default=30, metadata={"help": "cap on episodes per completion"})
    l2t_answer_column: str = dataclasses.field(default="answer", metadata={"help": "dataset column of the answer"})
    l2t_answer_cue: str = dataclasses.field(default="The answer is", metadata={"help": "Jr's cue before the answer"})
    l2t_answer_prefix: str = dataclasses.field(default=" ", metadata={"help": "text between cue and answer"})
    l2t_rank: int = dataclasses.field(default=8, metadata={"help": "rank of the parameter proxy per layer"})
    l2t_refresh_every: int = dataclasses.field(default=10, metadata={"help": "optimizer steps between SVDs"})
    l2t_damping: float = dataclasses.field(default=1e-5, metadata={"help": "Fisher damping"})
    l2t_process_norm: str = dataclasses.field(default="std", metadata={"help": "std | mean_std"})
    l2t_penalty_kind: str = dataclasses.field(default="fisher", metadata={"help": "fisher | count | tokens | none"})
    l2t_micro_batch: int = dataclasses.field(default=0, metadata={"help": "completions per reward forward (0: all)"})
    l2t_probes: str = dataclasses.field(default="auto", metadata={
        "help": "Jr probes: packed (in the reward's forward) | cache (from its KV cache) | auto (packed on CUDA)"})


class _RefreshBases(TrainerCallback):
    def __init__(self, trainer: L2TGRPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.l2t_reward is not None:
            self.trainer.l2t_reward.tracker.step()


class L2TGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose advantages carry L2T's per-token process term (see the module docstring).
    Takes an ``L2TConfig`` as ``args``; every other argument is ``GRPOTrainer``'s."""

    def __init__(self, *a, args: L2TConfig | None = None, **kw):
        if not isinstance(args, L2TConfig):
            raise InputError(f"L2TGRPOTrainer: args must be an L2TConfig, got {type(args).__name__}")
        super().__init__(*a, args=args, **kw)
        self.l2t_reward: DenseProcessReward | None = None  # built at the first step, on the final (wrapped) model
        self.add_callback(_RefreshBases(self))

    def _build_l2t_reward(self) -> DenseProcessReward:
        a, tok = self.args, self.processing_class
        ds = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if ds is not None and getattr(ds, "zero_stage", 0) == 3:
            raise InputError("L2TGRPOTrainer: DeepSpeed ZeRO-3 is not supported (the reward's forwards would gather "
                             "partitioned weights per process); use ZeRO-2 or accelerate's FSDP2 config")
        policy = self.accelerator.unwrap_model(self.model)
        tracker = FisherTracker(policy, rank=a.l2t_rank, seed=a.seed, refresh_every=a.l2t_refresh_every)
        jr = AnswerLikelihoodJr(policy, tok.encode(a.l2t_answer_cue, add_special_tokens=False), tok.pad_token_id)
        return DenseProcessReward(jr, tracker, alpha=a.l2t_alpha, beta=a.l2t_beta, damping=a.l2t_damping,
                                  penalty_kind=a.l2t_penalty_kind, micro_batch=a.l2t_micro_batch or None,
                                  probes=a.l2t_probes,
                                  gather=gather_rows if self.accelerator.num_processes > 1 else None)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:  # evaluation: TRL's outcome advantages only
            return out
        process = self.l2t_process_advantages(inputs, out)
        out["advantages"] = out["advantages"][:, None] * out["completion_mask"] + self.args.l2t_alpha * process
        return out

    def l2t_process_advantages(self, inputs: list[dict], out: dict) -> torch.Tensor:
        """(B, T_completion) process advantage of this process's rollouts (suffix sums of normalised episode
        rewards, 0 outside episodes); logs the l2t/* metrics."""
        a, tok = self.args, self.processing_class
        if self.l2t_reward is None:
            self.l2t_reward = self._build_l2t_reward()
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        resp = torch.cat([torch.zeros_like(out["prompt_mask"]), out["completion_mask"]], 1).bool()
        episodes = segment_episodes(ids, resp, list(a.l2t_markers), tokenizer=tok, max_episodes=a.l2t_max_episodes)
        answer_ids = [tok.encode(a.l2t_answer_prefix + str(x[a.l2t_answer_column]), add_special_tokens=False)
                      for x in inputs]
        policy = self.accelerator.unwrap_model(self.model)
        was_training = policy.training
        policy.eval()  # the reward's forward sees the policy as generation did (no dropout)
        try:
            with gathered(policy):  # FSDP2: full weights for the reward's forwards (no-op otherwise)
                parts = self.l2t_reward(Rollouts(ids, am, resp, episodes, answer_ids=answer_ids))
        finally:
            policy.train(was_training)
        suffix = self._group_suffix_sums(parts.r_prg.float(), parts.valid)
        self._log_l2t(parts, episodes)
        return episode_token_values(suffix, episodes)[:, out["prompt_ids"].shape[1]:]

    def _group_suffix_sums(self, r_prg: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Suffix sums of episode rewards normalised over whole groups (gathered across processes)."""
        acc, G = self.accelerator, self.num_generations
        if acc.num_processes == 1:
            return normalized_episode_rewards(r_prg, valid, G, norm=self.args.l2t_process_norm)[1]
        K = r_prg.shape[1]  # may differ per process: pad to the largest, then gather equal shapes
        K_max = int(acc.gather(torch.tensor([K], device=r_prg.device)).max())
        both = torch.zeros(r_prg.shape[0], K_max, 2, dtype=torch.float32, device=r_prg.device)
        both[:, :K, 0], both[:, :K, 1] = r_prg, valid.float()
        both = acc.gather(both)
        suffix = normalized_episode_rewards(both[..., 0], both[..., 1] > 0, G, norm=self.args.l2t_process_norm)[1]
        n = r_prg.shape[0]
        return suffix[acc.process_index * n:(acc.process_index + 1) * n, :K]

    def _log_l2t(self, parts, episodes: torch.Tensor) -> None:
        counts = (episodes.max(1).values + 1).float()
        v = parts.valid
        metrics = {"l2t/episodes_mean": counts.mean(), "l2t/single_episode_share": (counts == 1).float().mean(),
                   "l2t/penalty_mean": parts.penalty[v].float().mean() if v.any() else counts.new_zeros(()),
                   "l2t/jr_gain_mean": parts.jr_gain[v].float().mean() if v.any() else counts.new_zeros(())}
        for k, val in metrics.items():
            self._metrics["train"][k].append(self.accelerator.gather(val.reshape(1)).mean().item())
