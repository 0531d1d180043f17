"""Rollouts: G samples per prompt, laid out group-major, as one padded batch (prompt left-padded, response
right-padded) with the masks the reward and the loss need.

Two backends produce the same ``RolloutBatch``:
- ``generate``: Hugging Face ``model.generate`` (always available; the CPU path and the tests);
- ``VLLMRollouts``: a colocated vLLM engine on the training GPU, fed token ids (no re-tokenisation), whose
  weights are pushed from the training model after every optimizer step (``mark_stale`` then lazily at the
  next ``generate``).
``make_rollouts(backend, ...)`` picks one: "auto" uses vLLM when it is importable, the training device is a GPU
and the run is single-process, else HF; "vllm" raises the reason when it cannot be used.
"""

from __future__ import annotations

import os

import torch

from l2t_ext.lm.generation import RolloutBatch, generate, pack


def vllm_unavailable_reason(device: torch.device, world_size: int = 1) -> str | None:
    """Why the vLLM backend cannot run here (None if it can)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing at import time
        return f"vllm is not importable ({type(e).__name__}: {e}); pip install vllm, or use rollout_backend: hf"
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return (f"vLLM rollouts run colocated on the training GPU, and the training device is {device}; "
                "use rollout_backend: hf")
    if world_size > 1:
        return ("vLLM rollouts under torchrun (one colocated engine per rank) are not built; use "
                "rollout_backend: hf for multi-process runs")
    return None


class VLLMRollouts:
    """A colocated vLLM engine: built once from a snapshot of the training model (saved with
    ``save_pretrained``), then kept in sync by pushing the training weights into the engine's model
    (``load_weights``) before the first generation after each optimizer step. Prompts go in as token ids, so
    the episodes are segmented on exactly the ids the engine produced. Tensor parallelism 1 only."""

    def __init__(self, model, tokenizer, workdir: str, seed: int, gpu_memory_utilization: float = 0.3,
                 dtype: str = "bfloat16"):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: weights by reference
        import vllm

        self.vllm, self.model, self.tok = vllm, model, tokenizer
        snap = os.path.join(workdir, "vllm_init")
        model.save_pretrained(snap, safe_serialization=True)
        tokenizer.save_pretrained(snap)
        self.llm = vllm.LLM(model=snap, tokenizer=snap, dtype=dtype, seed=seed, skip_tokenizer_init=True,
                            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=1)
        self.stale = False
        self.syncs = 0

    def mark_stale(self) -> None:
        """The training weights changed (an optimizer step or a checkpoint load)."""
        self.stale = True

    def sync(self) -> None:
        """Push the training model's weights into the engine (HF names; the engine maps and casts them)."""
        weights = [(n, p.detach()) for n, p in self.model.state_dict().items()]
        if hasattr(self.llm, "apply_model"):  # vLLM >= 0.10: runs on the model inside each worker
            self.llm.apply_model(lambda m: m.load_weights(weights))
        else:  # older engines: the driver worker's model runner
            self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        self.stale = False
        self.syncs += 1

    @torch.no_grad()
    def generate(self, prompts: list[str], group_size: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0) -> RolloutBatch:
        if self.stale:
            self.sync()
        tok = self.tok
        pids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        sp = self.vllm.SamplingParams(n=group_size, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                      stop_token_ids=[tok.eos_token_id], detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in pids], sp, use_tqdm=False)
        rows_p, rows_r = [], []
        for p, o in zip(pids, outs):
            if len(o.outputs) != group_size:
                raise RuntimeError(f"vLLM returned {len(o.outputs)} samples for a prompt, expected {group_size}")
            for c in o.outputs:
                r = list(c.token_ids)
                if c.finish_reason == "stop" and (not r or r[-1] != tok.eos_token_id):
                    r.append(tok.eos_token_id)  # stopped at <eos>: keep it, as the HF path does
                rows_p.append(p)
                rows_r.append(r)
        return pack(tok, rows_p, rows_r, next(self.model.parameters()).device)


class HFRollouts:
    """HF ``generate`` on the training model itself (nothing to sync)."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer

    def mark_stale(self) -> None:
        pass

    def generate(self, prompts, group_size, max_new_tokens, temperature=1.0, top_p=1.0) -> RolloutBatch:
        return generate(self.model, self.tok, prompts, group_size, max_new_tokens, temperature, top_p)


def make_rollouts(backend: str, model, tokenizer, workdir: str, seed: int, world_size: int = 1,
                  gpu_memory_utilization: float = 0.3, dtype: str = "bfloat16"):
    """``backend``: "auto" (vLLM when usable, silently HF otherwise), "hf" or "vllm" (raises the reason)."""
    if backend not in ("auto", "hf", "vllm"):
        raise ValueError(f"rollout_backend must be 'auto', 'hf' or 'vllm', got {backend!r}")
    if backend == "hf":
        return HFRollouts(model, tokenizer)
    reason = vllm_unavailable_reason(next(model.parameters()).device, world_size)
    if reason is not None:
        if backend == "vllm":
            raise RuntimeError(f"rollout_backend=vllm: {reason}")
        return HFRollouts(model, tokenizer)
    return VLLMRollouts(model, tokenizer, workdir, seed, gpu_memory_utilization, dtype)
