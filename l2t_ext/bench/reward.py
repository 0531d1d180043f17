"""Cost of the L2T reward against one PPO training step's forward+backward on the same batch.

Configs (``--config``): ``cpu``: a tiny Qwen2 (the demo's size class); ``cpu-smollm2``: a randomly initialised
model with SmolLM2-135M-Instruct's shapes (Llama, 49152-token vocabulary) in float32; ``cpu-host``: Qwen2-0.5B's
24 blocks at tiny widths and 2 x 48 tokens (the host's per-operator cost alone); ``cuda``: Qwen2-0.5B shapes in
bf16. Timed: (a) step = forward + backward of the response log-likelihood through all parameters
(what every PPO step pays), (b) penalty = FisherTracker.episode_grads + compression_penalty, with the token
log-probs through the chunked output layer (the default where the model allows it) and (b') penalty_full the
same through full (B, L, vocab) logits, (c) Jr = AnswerLikelihoodJr probes in one packed forward of rollout +
probes (their path without a KV cache) and (c') jr_cached = the probes from a KV cache, after rollout_cache =
the no-grad decoder forward that leaves it (their difference: the probes of the reward's cache path), (d) the
whole DenseProcessReward call (its default probe path: packed on CUDA, the KV cache elsewhere), and (d') each
path explicitly: reward_packed (the probes ride behind the rollout in the tracker's forward) and reward_cache.
Peak memory of each likewise (CPU: peak RSS growth in a fresh process), the host time until each call
returns (close to its wall time where the host sets the pace), and the ATen operators each call issues (the host's
work, a count rather than a time).
``--profile FILE`` also writes a torch.profiler table (self time per op, top rows) of one call each of the reward
(and of its cache path), the penalty, the probes and the step: where the reward's time goes on the device, not
only how much.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from l2t_ext.bench import _harness as H
from l2t_ext.lm.masks import CUSTOM_MASK_IMPLEMENTATIONS

MARKER = 7

CONFIGS = {
    "cpu": dict(arch="qwen2", model=dict(vocab_size=64, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2),
                batch=dict(B=16, prompt=32, L=192, episode=16, answer=4, cue=3), dtype="float32"),
    "cpu-smollm2": dict(arch="llama", model=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                                 num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                                 tie_word_embeddings=True),
                        batch=dict(B=8, prompt=64, L=256, episode=24, answer=4, cue=3), dtype="float32"),
    # Qwen2-0.5B's 24 blocks at tiny widths and few tokens: next to no arithmetic, so the time is the host's
    # per-operator cost, which a GPU run pays in full wherever the host, not the device, sets the pace
    "cpu-host": dict(arch="qwen2", model=dict(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=24, num_attention_heads=4, num_key_value_heads=2,
                                              tie_word_embeddings=True),
                     batch=dict(B=2, prompt=8, L=48, episode=6, answer=8, cue=4), dtype="float32"),
    "cuda": dict(arch="qwen2", model=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                          tie_word_embeddings=True),
                 batch=dict(B=8, prompt=128, L=1024, episode=64, answer=8, cue=4), dtype="bfloat16"),
}


def build(config: str, attn: str = "sdpa"):
    import transformers

    from l2t_ext.reward import AnswerLikelihoodJr, DenseProcessReward, FisherTracker, Rollouts, segment_episodes

    cfg, device = CONFIGS[config], _device(config)
    torch.manual_seed(0)
    Config, Model = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                     "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[cfg["arch"]]
    mcfg = Config(max_position_embeddings=4096, attn_implementation=attn, **cfg["model"])
    model = Model(mcfg).to(device=device, dtype=getattr(torch, cfg["dtype"])).eval()
    b = cfg["batch"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, min(cfg["model"]["vocab_size"], 1000), (b["B"], b["L"]), generator=g)
    resp = torch.zeros(b["B"], b["L"], dtype=torch.bool)
    resp[:, b["prompt"]:] = True
    for p in range(b["prompt"] + b["episode"] - 1, b["L"] - 8, b["episode"]):
        ids[:, p] = MARKER  # episodes of b["episode"] tokens, then a short final answer
    ids, resp = ids.to(device), resp.to(device)
    am = torch.ones_like(ids)
    ep = segment_episodes(ids, resp, [[MARKER]])
    answers = [[11 + (i % 5)] * b["answer"] for i in range(b["B"])]
    r = Rollouts(ids, am, resp, ep, answer_ids=answers)
    tracker = FisherTracker(model, rank=16)
    jr = AnswerLikelihoodJr(model, cue_ids=list(range(20, 20 + b["cue"])))
    reward = DenseProcessReward(jr, tracker)
    return model, r, tracker, jr, reward


def _device(config: str) -> str:
    return "cuda" if config == "cuda" else "cpu"


def _fns(config, attn="sdpa"):
    from l2t_ext.lm import no_cache, output_cache, split_head
    from l2t_ext.reward import DenseProcessReward, FisherTracker, compression_penalty
    from l2t_ext.reward.fisher import position_ids_from_mask, token_logprobs

    model, r, tracker, jr, reward = build(config, attn)
    dec = split_head(model)[0]
    tracker_full = FisherTracker(model, rank=16, logprobs="full")
    pos = position_ids_from_mask(r.attention_mask)
    mask = r.response_mask.clone()
    mask[:, :-1] = r.response_mask[:, 1:]  # position t predicts token t+1
    mask[:, -1] = False

    def step():  # as the loop's policy runs it (no KV cache)
        out = model(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=pos, **no_cache(model))
        lp = token_logprobs(out.logits, r.input_ids)
        loss = -(lp * mask).sum() / mask.sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    K = r.num_episodes
    valid = torch.arange(K, device=r.input_ids.device)[None] < (r.episode_ids.max(1).values + 1)[:, None]

    def penalty(t=tracker):
        g = t.episode_grads(r.input_ids, r.attention_mask, r.episode_ids, num_episodes=K)
        return compression_penalty(g, valid)

    @torch.no_grad()
    def forward():  # the rollout's old log-probs: what the loop pays anyway, and what the reward returns
        out = model(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=pos, **no_cache(model))
        return token_logprobs(out.logits, r.input_ids)

    @torch.no_grad()
    def rollout_cache():  # the decoder forward that leaves the KV cache the reward's cache path continues from
        out = dec(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=pos, use_cache=True)
        return output_cache(out)

    paths = {p: DenseProcessReward(jr, tracker, probes=p) for p in ("packed", "cache")}
    return {"step": step, "forward": forward, "penalty": penalty, "penalty_full": lambda: penalty(tracker_full),
            "jr": lambda: jr(r)[0], "rollout_cache": rollout_cache,
            "jr_cached": lambda: jr(r, cache=rollout_cache())[0], "reward": lambda: reward(r).r_prg,
            "reward_packed": lambda: paths["packed"](r).r_prg, "reward_cache": lambda: paths["cache"](r).r_prg}, r


def _host_ms(fn, device: str, calls: int = 3) -> float:
    """Median host time until fn() returns, the device idle at the start and not waited for at the end: close to
    the wall time (``ms``) when the host, not the device, sets the pace (or when fn synchronises itself)."""
    samples = []
    for _ in range(calls):
        H.sync(device)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    H.sync(device)
    return statistics.median(samples)


def _aten_ops(fn) -> int:
    """ATen operators one call of fn issues (views included; its backward's too): the host's work per call, which
    a GPU run pays whenever the host, not the device, sets the pace. Deterministic, unlike a time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def _child(config: str, name: str, attn: str) -> float:
    fns, _ = _fns(config, attn)
    return H.child_peak({}, lambda _inputs: fns[name]())


def run(config: str, attn: str = "sdpa") -> dict:
    device = _device(config)
    fns, r = _fns(config, attn)
    machine = H.machine_info(device)
    res = {"machine": machine, "config_name": config, "config": CONFIGS[config], "attn_implementation": attn,
           "episodes_per_row": r.num_episodes, "results": {}}
    for name, fn in fns.items():
        t = H.time_fn(fn, device, budget_s=3.0, max_reps=20)
        if device == "cuda":
            mem = H.cuda_peak_mb(fn)
        else:
            code = "import sys; from l2t_ext.bench.reward import _child; print(_child(*sys.argv[1:]))"
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            out = subprocess.run([sys.executable, "-c", code, config, name, attn], capture_output=True, text=True,
                                 env=env, cwd=tempfile.gettempdir())
            mem = float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
        res["results"][name] = dict(ms=t["ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], peak_mem_mb=mem,
                                    host_ms=_host_ms(fn, device), aten_ops=_aten_ops(fn))
    R = res["results"]
    step = R["step"]["ms"]
    res["ratios"] = {k: R[k]["ms"] / step for k in ("penalty", "penalty_full", "jr", "reward")}
    # the reward's forward replaces the old-log-prob forward the loop needs anyway
    res["ratios"]["reward_net_of_old_logprob_forward"] = (R["reward"]["ms"] - R["forward"]["ms"]) / step
    res["ratios"]["penalty_net_of_old_logprob_forward"] = (R["penalty"]["ms"] - R["forward"]["ms"]) / step
    # the same nets in host work: ATen operators per call net of the forward's, over the step's
    ops = {k: v["aten_ops"] for k, v in R.items()}
    res["ops_net_of_old_logprob_forward"] = {k: (ops[k] - ops["forward"]) / ops["step"]
                                             for k in ("reward", "reward_packed", "reward_cache", "penalty")}
    # the probes as the reward's cache path runs them: from the rollout forward's KV cache
    res["ratios"]["probes_from_cache"] = (R["jr_cached"]["ms"] - R["rollout_cache"]["ms"]) / step
    # the two probe paths once more, their calls interleaved: their ratio is the question, not each one's time
    samples, _ = H.time_interleaved({k: fns[k] for k in ("reward_packed", "reward_cache")}, device,
                                    reps=10 if device == "cuda" else 5)
    res["interleaved_ms"] = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    res["ratios"]["packed_speedup_over_cache"] = res["interleaved_ms"]["reward_cache"] / \
        res["interleaved_ms"]["reward_packed"]
    if R["step"]["peak_mem_mb"] and R["reward"]["peak_mem_mb"] is not None:
        res["extra_peak_mem_frac"] = max(0.0, R["reward"]["peak_mem_mb"] - R["step"]["peak_mem_mb"]) / \
            R["step"]["peak_mem_mb"]
    return res


def profile(config: str, path: str, parts=("reward", "reward_cache", "penalty", "jr", "step"), rows: int = 30,
            attn: str = "sdpa") -> None:
    """One warmed-up call of each part under torch.profiler; writes each part's top ops by self device time."""
    device = _device(config)
    fns, _ = _fns(config, attn)
    with open(path, "w") as f:
        for name in parts:
            f.write(f"## {name} ({config}, {attn}); {H.profile_table(fns[name], device, rows)}\n\n")


def markdown(res: dict) -> str:
    m = res["machine"]
    attn = res.get("attn_implementation", "sdpa")
    lines = [f"Reward cost ({res.get('config_name', '?')}, {attn} attention) on {m.get('gpu') or m['cpu']} "
             f"({m['cpu_cores']} cores), "
             f"torch {m['torch']}; "
             f"{res['config']['dtype']}, batch {res['config']['batch']}, {res['episodes_per_row']} episodes/row", "",
             "| part | ms (p20-p80) | host ms | aten ops | peak MB | x of step |", "|---|---|---|---|---|---|"]
    step = res["results"]["step"]["ms"]
    for k, v in res["results"].items():
        mem = "-" if v["peak_mem_mb"] is None else f"{v['peak_mem_mb']:.0f}"
        host = f"{v['host_ms']:.2f}" if "host_ms" in v else "-"
        lines.append(f"| {k} | {v['ms']:.2f} ({v['p20_ms']:.2f}-{v['p80_ms']:.2f}) | {host} | "
                     f"{v.get('aten_ops', '-')} | {mem} | {v['ms'] / step:.2f} |")
    rt = res["ratios"]
    lines.append(f"\nNet of the old-log-prob forward the reward replaces: reward "
                 f"{rt['reward_net_of_old_logprob_forward']:.2f}x, penalty "
                 f"{rt['penalty_net_of_old_logprob_forward']:.2f}x of the step")
    if "ops_net_of_old_logprob_forward" in res:
        on = res["ops_net_of_old_logprob_forward"]
        lines.append("\nHost work net of the forward (ATen operators per call over the step's): " +
                     ", ".join(f"{k} {v:.2f}x" for k, v in on.items()))
    if "probes_from_cache" in rt:
        lines.append(f"\nThe probes from the KV cache, as the reward's cache path runs them (jr_cached - "
                     f"rollout_cache): {rt['probes_from_cache']:.2f}x of the step")
    if "packed_speedup_over_cache" in rt:
        im = res["interleaved_ms"]
        lines.append(f"\nThe reward with its probes packed into the tracker's forward: "
                     f"{rt['packed_speedup_over_cache']:.2f}x the speed of the KV-cache path "
                     f"({im['reward_packed']:.2f} vs {im['reward_cache']:.2f} ms, medians of interleaved calls)")
    if "extra_peak_mem_frac" in res:
        lines.append(f"\nExtra peak memory of the reward over the step: {100 * res['extra_peak_mem_frac']:.1f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="shorthand for --config cpu / cuda")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None,
                   help="model and batch shapes (default: cuda when a GPU is present, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--attn", choices=CUSTOM_MASK_IMPLEMENTATIONS, default="sdpa",
                   help="the model's attn_implementation (flex_attention: the probes' masks are block-sparse "
                        "BlockMasks; compiled on first use; its backward needs CUDA)")
    p.add_argument("--json", default="bench_reward.json")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="also write a torch.profiler table of the reward, penalty, probes and step to FILE")
    args = p.parse_args(argv)
    if args.device and args.config and _device(args.config) != args.device:
        p.error(f"--config {args.config} runs on {_device(args.config)}, not --device {args.device}")
    config = args.config or args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.attn == "flex_attention" and _device(config) != "cuda":
        p.error("--attn flex_attention needs a CUDA config: torch's flex attention has no backward on the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(config, args.attn)
    print(markdown(res))
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    if args.profile:
        profile(config, args.profile, attn=args.attn)
    return 0
