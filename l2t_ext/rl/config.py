"""Training configuration: one dataclass with every knob of the loop. The same names are command-line flags
(``l2t train --help`` lists them all, built by ``transformers.HfArgumentParser``), YAML keys (``--config``) and
preset entries; flags override YAML, YAML overrides a preset, unknown keys and values of the wrong type are
errors naming the key. Defaults follow the paper where it gives them (lr 1e-6 for real models, alpha 0.8,
beta 0.6, damping 1e-5, warm-up ratio 0.1)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing

from l2t_ext.errors import InputError

METHODS = ("grpo", "length_penalty", "length_penalty_gated", "l2t", "l2t_no_penalty", "l2t_count", "l2t_tokens")
# the L2T ablations differ only in the penalty (DenseProcessReward's penalty_kind); everything else is l2t's
PENALTY_KIND = {"l2t": "fisher", "l2t_no_penalty": "none", "l2t_count": "count", "l2t_tokens": "tokens"}


def _f(default, help: str):
    """A field with its ``--help`` text (a callable default builds a fresh list per instance)."""
    if callable(default):
        return dataclasses.field(default_factory=default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    # what to train
    model: str = _f("tiny", "'tiny' (a tiny Qwen2 built from a config) or a local Hugging Face model directory")
    task: str = _f("arith", "'arith' (synthetic arithmetic), 'overthink' (arith, over-thinking warm start), 'word' "
                   "(word problems) or a .jsonl/.parquet file of {question, answer} or {problem, solution} rows")
    verifier: str = _f("auto", "auto (the task's: arith for arith, math for files) | arith | math | module:function")
    method: str = _f("l2t", "grpo | length_penalty (all answers' length) | length_penalty_gated (correct answers' "
                     "length only) | l2t | ablations l2t_no_penalty (beta 0), l2t_count (each episode costs the same), "
                     "l2t_tokens (penalty = episode tokens)")
    ppo: bool = _f(False, "value head + GAE over the same token rewards instead of group-normalised advantages")
    tiers: list[int] = _f(lambda: [1, 2, 3, 4], "arith difficulty tiers to sample")
    # rollouts
    steps: int = _f(100, "RL steps (optimizer steps)")
    prompts_per_step: int = _f(8, "prompts per step (per rank)")
    group_size: int = _f(8, "G samples per prompt")
    max_new_tokens: int = _f(256, "the token budget of a response")
    temperature: float = _f(1.0, "sampling temperature")
    top_p: float = _f(1.0, "nucleus sampling threshold")
    rollout_backend: str = _f("auto", "auto (vLLM if importable + GPU + single process, else HF) | hf | vllm")
    vllm_gpu_memory_utilization: float = _f(0.3, "share of the training GPU the colocated vLLM engine may take")
    # optimisation
    lr: float = _f(1e-6, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.1, "share of the steps with a linear LR warm-up (then cosine decay)")
    grad_clip: float = _f(1.0, "gradient norm clip")
    micro_batch: int = _f(16, "rollouts per forward/backward; gradients accumulate over the step's rollouts")
    ppo_epochs: int = _f(1, "mu: passes over the step's rollouts")
    clip_eps_low: float = _f(0.2, "PPO ratio clip below 1")
    clip_eps_high: float = _f(0.28, "PPO ratio clip above 1")
    loss_agg: str = _f("token-mean", "token-mean | seq-mean")
    kl_coef: float = _f(0.0, "k3 KL to the frozen initial policy (0 disables the reference model)")
    bf16: bool = _f(True, "bf16 autocast on GPU (ignored on CPU)")
    # rewards
    alpha: float = _f(0.8, "weight of the process reward (paper Eq. 5)")
    beta: float = _f(0.6, "weight of the compression penalty (paper Definition 4.1)")
    damping: float = _f(1e-5, "Fisher damping lambda")
    penalty_norm: str = _f("batch", "Pbar = P / scale: batch (the batch's mean penalty, the paper) | initial (the "
                           "first step's mean, then fixed) | none (raw P; retune beta)")
    penalty_mode: str = _f("batch", "batch (the batch's empirical Fisher) | self (g g^T per episode)")
    fisher_decay: float | None = _f(None, "EMA Fisher across steps (explicit p x p) instead of the batch Fisher")
    rank: int = _f(16, "rank r of the low-rank parameter proxy per tracked layer")
    refresh_every: int = _f(10, "optimizer steps between SVD basis refreshes")
    layers: str | None = _f(None, "tracked layers: unset (last block after attention) or a regex")
    answer_cue: str = _f("auto", "appended after a boundary to probe Jr, and before a forced answer in evaluation "
                         "(auto: the task's answer format: 'A:' for arith, 'The answer is' for files)")
    instruction: str = _f("auto", "text put before each question (as the system message under a chat template); "
                          "auto: none for arith, for files a request to reason in steps separated by the first "
                          "marker and to end with the answer cue")
    chat_template: str = _f("auto", "auto (apply the tokenizer's chat template when it has one) | none")
    markers: list[str] = _f(lambda: ["</think>"], "episode markers, matched in the decoded response: a mode (think, "
                            "paragraph, line, sentence), a literal string, or re:<regex>")
    max_episodes: int = _f(30, "cap on episodes per response")
    reward_micro_batch: int = _f(0, "rollouts per forward/backward of the l2t reward (0: the rank's whole batch at "
                                 "once; its (rows, length, vocab) logits bound the reward's memory)")
    reward_probes: str = _f("auto", "how the l2t reward runs its Jr probes: packed (behind the rollout in its "
                            "forward) | cache (a short second forward from its KV cache) | auto (packed on CUDA, "
                            "else cache)")
    process_norm: str = _f("std", "l2t episode-reward normalisation: std | mean_std (advantages.py says why)")
    length_coef: float = _f(0.5, "length_penalty: weight of the group-normalised length term")
    gamma: float = _f(1.0, "GAE discount (ppo)")
    lam: float = _f(0.95, "GAE lambda (ppo)")
    vf_coef: float = _f(0.5, "value loss weight (ppo)")
    # warm start: supervised steps on the task's reference traces before RL
    sft_steps: int = _f(0, "supervised warm-start steps before RL (tasks with reference traces)")
    sft_lr: float = _f(3e-3, "warm-start learning rate")
    sft_batch: int = _f(64, "warm-start examples per step")
    # machine and checkpoints
    parallel: str = _f("ddp", "under torchrun: ddp (replicated weights, all-reduced gradients) | fsdp (FSDP2: weights, "
                       "gradients and optimizer state sharded per transformer block; DCP checkpoints)")
    threads: int | None = _f(None, "torch intra-op CPU threads (unset: torch's default, one per physical core)")
    save_optimizer: bool = _f(True, "checkpoints hold the optimizer state (exact resume); false: weights, RNG and "
                              "reward state only (about 3x smaller with AdamW; a resume restarts the moments)")
    # tiny model size (model="tiny")
    hidden_size: int = _f(64, "hidden size of the tiny model")
    num_layers: int = _f(2, "layers of the tiny model")
    # bookkeeping
    seed: int = _f(0, "seed of the model init, the prompt stream and sampling")
    device: str = _f("auto", "auto | cpu | cuda")
    out: str = _f("l2t_out", "run directory (config.json, metrics.jsonl, checkpoints/, eval.json)")
    save_every: int = _f(50, "steps between checkpoints (and one at the end)")
    eval_every: int = _f(0, "steps between evaluations appended to evals.jsonl (0: none during training)")
    eval_problems: int = _f(64, "held-out problems evaluated after training and by l2t eval (0: no evaluation)")
    eval_samples: int = _f(4, "sampled responses per evaluated problem (pass@1 is their mean)")
    log_every: int = _f(1, "steps between progress lines when stderr is not a terminal")

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.loss_agg not in ("token-mean", "seq-mean"):
            raise InputError(f"loss_agg must be 'token-mean' or 'seq-mean', got {self.loss_agg!r}")
        if self.process_norm not in ("std", "mean_std"):
            raise InputError(f"process_norm must be 'std' or 'mean_std', got {self.process_norm!r}")
        if self.penalty_norm not in ("batch", "initial", "none"):
            raise InputError(f"penalty_norm must be 'batch', 'initial' or 'none', got {self.penalty_norm!r}")
        if self.penalty_mode not in ("batch", "self"):
            raise InputError(f"penalty_mode must be 'batch' or 'self', got {self.penalty_mode!r}")
        if self.reward_probes not in ("auto", "packed", "cache"):
            raise InputError(f"reward_probes must be 'auto', 'packed' or 'cache', got {self.reward_probes!r}")
        if self.rollout_backend not in ("auto", "hf", "vllm"):
            raise InputError(f"rollout_backend must be 'auto', 'hf' or 'vllm', got {self.rollout_backend!r}")
        if not 0.0 < self.vllm_gpu_memory_utilization < 1.0:
            raise InputError(f"vllm_gpu_memory_utilization must be in (0, 1), got {self.vllm_gpu_memory_utilization!r}")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "micro_batch", "ppo_epochs",
                     "eval_samples", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("eval_every", "eval_problems", "sft_steps", "reward_micro_batch"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.group_size < 2 and not self.ppo:
            raise InputError("group_size must be >= 2 for group-normalised advantages (or set ppo: true)")
        if not self.tiers or any(t not in (1, 2, 3, 4) for t in self.tiers):
            raise InputError(f"tiers must be a non-empty list of 1..4, got {self.tiers!r}")
        if not self.markers:
            raise InputError("markers must list at least one episode marker")
        if self.chat_template not in ("auto", "none"):
            raise InputError(f"chat_template must be 'auto' or 'none', got {self.chat_template!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise InputError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads!r}")

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        """A config from ``d`` over the defaults; unknown keys and wrong types raise ``ValueError`` naming the
        key (and ``source``: a file, 'preset x', 'the command line')."""
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown:
            raise InputError(f"{source}: unknown config key(s) {unknown}; valid keys: {', '.join(cls.keys())}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k], source) for k, v in d.items()})

    def override(self, pairs: list[str]) -> TrainConfig:
        """This config with ``key=value`` strings applied (values parsed as YAML scalars/lists); for scripts."""
        import yaml

        d = dataclasses.asdict(self)
        for p in pairs:
            if "=" not in p:
                raise InputError(f"override {p!r} must look like key=value")
            k, v = p.split("=", 1)
            d[k.strip()] = yaml.safe_load(v)
        return TrainConfig.from_dict(d, "override")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def load_yaml(path: str) -> dict:
    """The mapping of a YAML config file (keys are checked by ``TrainConfig.from_dict``)."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config file must be a mapping of key: value")
    return data


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(key: str, value, hint, source: str = "config"):
    """``value`` checked against the field type ``hint`` (int widened to float, a tuple or a single string to a
    list); ``ValueError`` naming the key and the expected type otherwise."""
    def bad():
        return InputError(f"{source}: config key {key!r} must be {_type_name(hint)}, got {value!r}")

    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad()
        (elem,) = typing.get_args(hint)
        return [_coerce(f"{key}[{i}]", v, elem, source) for i, v in enumerate(value)]
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise bad()
    return value


PRESETS: dict[str, dict] = {
    # CPU-sized: a tiny Qwen2 warm-started on the arithmetic task's traces, then a few RL steps
    "tiny-arith": dict(model="tiny", task="arith", verifier="arith", steps=20, prompts_per_step=8, group_size=4,
                       max_new_tokens=96, lr=1e-4, rank=8, refresh_every=5, micro_batch=32, sft_steps=300,
                       save_every=10, eval_problems=32, eval_samples=2, device="cpu", tiers=[1, 2, 3, 4],
                       length_coef=0.2),  # 0.5 collapses to merged steps on this task (README, demo investigation)
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return TrainConfig.from_dict(PRESETS[name], f"preset {name!r}")


def resolve_config(preset_name: str | None = None, yaml_path: str | None = None, base: dict | None = None,
                   flags: dict | None = None) -> TrainConfig:
    """The config from layers, later ones winning: the defaults, ``base`` (a run's saved config), a preset, a YAML
    file, command-line flags. Each layer is checked as it is added, so an error names the layer it came from."""
    if preset_name is not None and preset_name not in PRESETS:
        raise InputError(f"unknown preset {preset_name!r}; presets: {sorted(PRESETS)}")
    layers = [(base, "the run's saved config"), (PRESETS.get(preset_name or ""), f"preset {preset_name!r}"),
              (load_yaml(yaml_path) if yaml_path else None, yaml_path), (flags, "command line")]
    d: dict = {}
    cfg = TrainConfig()
    for layer, source in layers:
        if layer:
            d.update(layer)
            cfg = TrainConfig.from_dict(d, source)
    return cfg
