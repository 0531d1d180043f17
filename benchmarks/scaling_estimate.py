"""Memory and time per training step of ``l2t train`` for 1.5B and 7B policies on 1, 8 and 64 GPUs, DDP vs FSDP,
computed from the code's own quantities (docs/scaling.md explains every term and assumption).

Nothing here runs a model: parameter counts come from the real architectures instantiated on the meta device
(Qwen2.5-1.5B / -7B shapes), the tracked layers and the proxy size p from ``FisherTracker``'s defaults, the
batch from ``TrainConfig``-style knobs. Writes JSON (``--out``) and prints the markdown tables.

    python benchmarks/scaling_estimate.py --out benchmarks/results/scaling.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import transformers

from l2t_ext.reward.fisher import default_layers

GB = 1e9
MODELS = {  # published config.json values of the Qwen2.5 base models
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


@dataclasses.dataclass
class Run:
    """One RL step's shape (the knobs of ``l2t train``; the global batch is fixed, split over the GPUs)."""

    prompts: int = 64  # global prompts per step (prompts_per_step x GPUs)
    group_size: int = 8
    prompt_len: int = 256
    max_new_tokens: int = 2048  # the padded response length
    mean_new_tokens: int = 1024  # the mean response length (compute)
    episodes: int = 10  # mean episodes per response
    probe_tokens: int = 12  # Jr cue + answer tokens per episode boundary
    micro_batch: int = 2  # rollouts per loss forward/backward
    reward_micro_batch: int = 2  # rollouts per reward forward/backward
    logprob_chunk: int = 1024  # positions per output-layer chunk in the reward (FisherTracker's logprob_chunk)
    rank: int = 16  # r of the proxy per tracked layer
    kl_ref: bool = False  # kl_coef > 0 keeps a frozen fp32 reference copy


@dataclasses.dataclass
class Hardware:
    """H100 SXM (80 GB); the bandwidths are the usual effective values, not peaks."""

    mem_gb: float = 80.0
    bf16_flops: float = 989e12  # dense
    mfu: float = 0.40  # fraction of it the training matmuls reach
    hbm: float = 3.35e12 * 0.8  # bytes/s achieved in decode
    nvlink: float = 360e9  # ring bus bandwidth per GPU inside a node (8 GPUs)
    network: float = 45e9  # per GPU across nodes (400 Gb/s InfiniBand per GPU)


def shapes(name: str) -> dict:
    cfg = transformers.Qwen2Config(**MODELS[name])
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(cfg)
    P = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    tracked = default_layers(model)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return dict(P=P, P_block=block, P_root=P - cfg.num_hidden_layers * block, layers=cfg.num_hidden_layers,
                hidden=cfg.hidden_size, vocab=cfg.vocab_size, kv_dim=cfg.num_key_value_heads * head_dim,
                tracked=tracked, n_tracked=len(tracked))


def estimate(m: dict, run: Run, hw: Hardware, gpus: int, mode: str) -> dict:
    P, N = m["P"], gpus
    s = N if mode == "fsdp" else 1  # shard factor of weights, gradients and optimizer state
    rows = run.prompts * run.group_size // N  # rollouts per GPU
    L = run.prompt_len + run.max_new_tokens
    T = rows * (run.prompt_len + run.mean_new_tokens)  # tokens per GPU
    p = m["n_tracked"] * run.rank ** 2
    E_global = run.prompts * run.group_size * run.episodes
    # ---- memory (bytes per GPU)
    weights, grads, adam = 4 * P / s, 4 * P / s, 8 * P / s  # fp32 master weights, fp32 gradients, AdamW m and v
    ref = 4 * P / s if run.kl_ref else 0.0
    gathered = 4 * P if mode == "fsdp" and N > 1 else 0.0  # collect runs on the all-gathered fp32 weights
    kv = 2 * m["layers"] * m["kv_dim"] * 2 * rows * L  # bf16 K and V for every rollout (one generate call)
    # the reward's output layer runs logprob_chunk positions at a time (Qwen2 qualifies for the chunked path):
    # bf16 logits + fp32 copy + exp / gradient of one chunk
    logits = 10 * min(run.logprob_chunk, run.reward_micro_batch * L) * m["vocab"]
    fisher = 4 * E_global * p * 2  # gathered episode gradients (+ the rank's own, padded)
    rollout_phase = weights + adam + ref + gathered + kv + logits + fisher
    blocks = 4 * (m["P_root"] + 2 * m["P_block"]) if mode == "fsdp" and N > 1 else 0.0  # unit in use + prefetch
    acts = 34 * run.micro_batch * L * m["hidden"] * m["layers"]  # bf16 autocast, no recomputation
    loss_logits = 10 * run.micro_batch * L * m["vocab"]
    update_phase = weights + grads + adam + ref + blocks + acts + loss_logits
    # ---- time (seconds per step)
    flops = 6 * P * T + 2 * P * T + 2 * P * rows * run.episodes * run.probe_tokens  # loss fwd+bwd, reward fwd, Jr
    compute = flops / (hw.bf16_flops * hw.mfu)
    decode_hf = run.max_new_tokens * (8 * P + kv / 2) / hw.hbm  # fp32 weights read + bf16 casts per token
    decode_vllm = run.max_new_tokens * (2 * P + kv / 2) / hw.hbm  # bf16 weights, continuous batching
    bw = hw.nvlink if N <= 8 else hw.network
    ring = (N - 1) / N if N > 1 else 0.0
    n_micro = -(-rows // run.micro_batch)
    if mode == "ddp":
        comm = 2 * ring * 4 * P / bw  # one fp32 all-reduce of the gradients
    else:  # per micro-batch: all-gather (forward), all-gather (backward), reduce-scatter; + the rollout gather
        comm = (3 * n_micro + 1) * ring * 4 * P / bw
    fisher_comm = ring * 4 * E_global * p / bw
    return dict(gpus=N, mode=mode, rollouts_per_gpu=rows, p=p, episodes_global=E_global,
                mem_rollout_gb=rollout_phase / GB, mem_update_gb=update_phase / GB,
                fits=max(rollout_phase, update_phase) / GB <= hw.mem_gb,
                parts_gb={k: v / GB for k, v in dict(weights=weights, grads=grads, adam=adam, ref=ref,
                                                     gathered=gathered, kv_cache=kv, reward_logits=logits,
                                                     fisher=fisher, fsdp_units=blocks, activations=acts,
                                                     loss_logits=loss_logits).items()},
                time_s=dict(generate_hf=decode_hf, generate_vllm=decode_vllm, compute=compute, comm=comm,
                            fisher_allgather=fisher_comm),
                fisher_allgather_mb=4 * E_global * p / 1e6)


def table(rows: list[dict]) -> str:
    head = ("| model | GPUs | mode | rollouts/GPU | memory: rollout / update (GB) | fits 80 GB "
            "| generate HF / vLLM (s) | fwd+bwd (s) | comm (s) | Fisher all-gather |")
    out = [head, "|" + "---|" * 10]
    for r in rows:
        t = r["time_s"]
        out.append(f"| {r['model']} | {r['gpus']} | {r['mode']} | {r['rollouts_per_gpu']} | "
                   f"{r['mem_rollout_gb']:.0f} / {r['mem_update_gb']:.0f} | {'yes' if r['fits'] else 'no'} | "
                   f"{t['generate_hf']:.0f} / {t['generate_vllm']:.0f} | {t['compute']:.1f} | {t['comm']:.2f} | "
                   f"{r['fisher_allgather_mb']:.0f} MB, {t['fisher_allgather'] * 1e3:.1f} ms |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the estimates as JSON here")
    args = ap.parse_args()
    run, hw = Run(), Hardware()
    rows = []
    for name in MODELS:
        m = shapes(name)
        print(f"{name}: {m['P'] / 1e9:.2f}B parameters, block {m['P_block'] / 1e6:.0f}M, root "
              f"{m['P_root'] / 1e6:.0f}M, tracked {m['n_tracked']} layers, p = {m['n_tracked'] * run.rank ** 2}")
        for gpus in (1, 8, 64):
            for mode in (("ddp",) if gpus == 1 else ("ddp", "fsdp")):
                rows.append({"model": name, **estimate(m, run, hw, gpus, mode)})
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"run": dataclasses.asdict(run), "hardware": dataclasses.asdict(hw),
                       "models": {n: {k: v for k, v in shapes(n).items() if k != "tracked"} for n in MODELS},
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
