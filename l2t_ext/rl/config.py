"""Training configuration: one dataclass with every knob of the loop, loadable from YAML, overridable from the
command line (``--set key=value``), with named presets. Defaults follow the paper where it gives them
(lr 1e-6 for real models, alpha 0.8, beta 0.6, damping 1e-5, warm-up ratio 0.1)."""

from __future__ import annotations

import dataclasses
import json
import typing

METHODS = ("grpo", "length_penalty", "l2t")


@dataclasses.dataclass
class TrainConfig:
    # what to train
    model: str = "tiny"  # "tiny" (a tiny Qwen2 built from a config) or a local HF model directory
    task: str = "arith"  # "arith" (synthetic, generated) or a .jsonl/.parquet file of {question, answer}
    verifier: str = "arith"  # "arith", "math" or "module:function"
    method: str = "l2t"  # grpo | length_penalty | l2t
    ppo: bool = False  # value head + GAE over the same token rewards instead of group-normalised advantages
    tiers: tuple[int, ...] = (1, 2, 3, 4)  # arith difficulty tiers to sample
    # rollouts
    steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 8  # G samples per prompt
    max_new_tokens: int = 256  # the token budget
    temperature: float = 1.0
    top_p: float = 1.0
    rollout_backend: str = "auto"  # auto (vLLM if importable + GPU + single process, else HF) | hf | vllm
    vllm_gpu_memory_utilization: float = 0.3  # share of the training GPU the colocated vLLM engine may take
    # optimisation
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    micro_batch: int = 16  # rollouts per forward/backward; gradients accumulate over the step's rollouts
    ppo_epochs: int = 1  # mu: passes over the step's rollouts
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    loss_agg: str = "token-mean"  # token-mean | seq-mean
    kl_coef: float = 0.0  # k3 KL to the frozen initial policy (0 disables the reference model)
    bf16: bool = True  # bf16 autocast on GPU (ignored on CPU)
    # rewards
    alpha: float = 0.8
    beta: float = 0.6
    damping: float = 1e-5
    penalty_mode: str = "batch"  # batch | self
    fisher_decay: float | None = None  # EMA Fisher across steps (explicit p x p) instead of the batch Fisher
    rank: int = 16
    refresh_every: int = 10  # optimizer steps between SVD basis refreshes
    layers: str | None = None  # tracked layers: None (last block after attention) or a regex
    answer_cue: str = "A:"  # appended after a boundary to probe Jr (AnswerLikelihoodJr)
    markers: tuple[str, ...] = ("</think>",)
    max_episodes: int = 30
    process_norm: str = "std"  # l2t episode-reward normalisation: std | mean_std (advantages.py says why)
    length_coef: float = 0.5  # length_penalty: weight of the group-normalised length term
    gamma: float = 1.0  # GAE discount (ppo)
    lam: float = 0.95  # GAE lambda (ppo)
    vf_coef: float = 0.5  # value loss weight (ppo)
    # warm start (tiny presets): supervised steps on the task's reference traces before RL
    sft_steps: int = 0
    sft_lr: float = 3e-3
    sft_batch: int = 64
    # tiny model size (model="tiny")
    hidden_size: int = 64
    num_layers: int = 2
    # bookkeeping
    seed: int = 0
    device: str = "auto"
    out: str = "l2t_out"
    save_every: int = 50
    eval_every: int = 0  # 0: only at the end
    eval_problems: int = 64
    log_every: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.loss_agg not in ("token-mean", "seq-mean"):
            raise ValueError(f"loss_agg must be 'token-mean' or 'seq-mean', got {self.loss_agg!r}")
        if self.process_norm not in ("std", "mean_std"):
            raise ValueError(f"process_norm must be 'std' or 'mean_std', got {self.process_norm!r}")
        if self.penalty_mode not in ("batch", "self"):
            raise ValueError(f"penalty_mode must be 'batch' or 'self', got {self.penalty_mode!r}")
        if self.rollout_backend not in ("auto", "hf", "vllm"):
            raise ValueError(f"rollout_backend must be 'auto', 'hf' or 'vllm', got {self.rollout_backend!r}")
        if not 0.0 < self.vllm_gpu_memory_utilization < 1.0:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1), got {self.vllm_gpu_memory_utilization!r}")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "micro_batch", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.group_size < 2 and not self.ppo:
            raise ValueError("group_size must be >= 2 for group-normalised advantages (or set ppo: true)")

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; valid keys: {', '.join(cls.keys())}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in d.items()})

    @classmethod
    def from_yaml(cls, path: str) -> TrainConfig:
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a mapping of key: value")
        return cls.from_dict(data)

    def override(self, pairs: list[str]) -> TrainConfig:
        """Apply ``key=value`` strings (values parsed as YAML scalars/lists)."""
        import yaml

        d = dataclasses.asdict(self)
        for p in pairs:
            if "=" not in p:
                raise ValueError(f"override {p!r} must look like key=value")
            k, v = p.split("=", 1)
            d[k.strip()] = yaml.safe_load(v)
        return TrainConfig.from_dict(d)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def _coerce(key, value, hint):
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"config key {key!r} must be true/false, got {value!r}")
    return value


PRESETS: dict[str, dict] = {
    # CPU-sized: a tiny Qwen2 warm-started on the arithmetic task's traces, then a few RL steps
    "tiny-arith": dict(model="tiny", task="arith", verifier="arith", steps=20, prompts_per_step=8, group_size=4,
                       max_new_tokens=96, lr=1e-4, rank=8, refresh_every=5, micro_batch=32, sft_steps=300,
                       save_every=10, eval_problems=32, device="cpu", tiers=(1, 2, 3, 4),
                       length_coef=0.2),  # 0.5 collapses to merged steps on this task (README, demo investigation)
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return TrainConfig.from_dict(PRESETS[name])
