"""Data-parallel training under ``torchrun`` (2 CPU ranks, gloo), replicated (DDP) and fully sharded (FSDP2):
the update equals the single-process update on the union of the ranks' rollouts; a full ``l2t train`` run works,
and resuming it from a checkpoint reproduces the uninterrupted run bitwise (every rank's RNG state is restored;
under fsdp the sharded weights and AdamW moments come back through torch.distributed.checkpoint)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

UPDATE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from l2t_ext.rl.builders import exit_process
    from l2t_ext.rl.config import preset
    from l2t_ext.rl.sharding import full_parameters
    from l2t_ext.rl.trainer import ScoredBatch, Trainer

    out, agg, parallel = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = preset("tiny-arith").override(["method=grpo", "sft_steps=0", "hidden_size=32", "num_layers=2",
                                         "micro_batch=3", f"loss_agg={agg}", f"out={out}", f"parallel={parallel}"])
    t = Trainer(cfg)
    t.opt = torch.optim.SGD(t.model.parameters(), lr=1.0)  # params move by exactly the clipped gradient
    g = torch.Generator().manual_seed(123)  # the same global batch on every process
    B, L, V = 8, 12, t.model.config.vocab_size
    ids = torch.randint(0, V, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i in range(B):
        mask[i, 4:4 + 2 + i % 5] = True  # ragged responses: token-mean weights differ per row
    adv = torch.randn(B, L, generator=g) * mask
    with torch.no_grad():
        old = t.policy(ids, am)[0] + 0.05 * torch.randn(B, L, generator=g)
    rows = slice(t.rank * B // t.world, (t.rank + 1) * B // t.world)
    n = rows.stop - rows.start
    batch = ScoredBatch(input_ids=ids[rows], attention_mask=am[rows], response_mask=mask[rows], completions=[""] * n,
                        answers=[""] * n, episode_ids=torch.full((n, L), -1), episode_ids_pred=torch.full((n, L), -1),
                        loss_mask=mask[rows], outcome=torch.zeros(n), sequence_reward=torch.zeros(n),
                        old_logprobs=old[rows], ref_logprobs=None, reward=None, advantages=adv[rows])
    t.update(batch)
    flat = torch.cat([p.reshape(-1) for p in full_parameters(t.model)])  # fsdp: gathered from the shards
    torch.save(flat, os.path.join(out, f"params_w{t.world}_r{t.rank}.pt"))
    t.close()
    exit_process()  # as l2t's CLI does
""")


REWARD_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from l2t_ext.reward import DenseProcessReward, FisherTracker, Rollouts
    from l2t_ext.lm import tiny_qwen2
    from l2t_ext.rl.builders import exit_process
    from l2t_ext.tasks import arith

    out = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gather = None
    if world > 1:
        import torch.distributed as dist
        from l2t_ext.rl.builders import gather_rows
        dist.init_process_group("gloo")
        gather = gather_rows
    rank = int(os.environ.get("RANK", "0"))
    tok = arith.tokenizer()
    model = tiny_qwen2(tok, hidden_size=32, num_layers=1, seed=0).eval()
    g = torch.Generator().manual_seed(7)
    B, L = 6, 20
    ids = torch.randint(5, 30, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    resp = torch.zeros(B, L, dtype=torch.bool)
    resp[:, 6:] = True
    ep = torch.full((B, L), -1)
    for b in range(B):  # 1 + b % 3 episodes per row: ranks hold different numbers of episodes
        k = 1 + b % 3
        cuts = torch.linspace(6, L, k + 1).long()
        for j in range(k):
            ep[b, cuts[j]:cuts[j + 1]] = j
    jr = lambda r, cache=None: (torch.arange(r.input_ids.shape[0] * (r.num_episodes + 1), dtype=torch.float32)
                                .reshape(r.input_ids.shape[0], -1) * 0.01, torch.ones(r.input_ids.shape[0],
                                r.num_episodes + 1, dtype=torch.bool))
    rows = slice(rank * B // world, (rank + 1) * B // world)
    rw = DenseProcessReward(jr, FisherTracker(model, rank=4, seed=0), gather=gather)
    o = rw(Rollouts(ids[rows], am[rows], resp[rows], ep[rows], answers=["1"] * (rows.stop - rows.start)))
    torch.save({"P": o.penalty, "Pbar": o.penalty_normalized, "valid": o.valid},
               os.path.join(out, f"r{rank}_w{world}.pt"))
    exit_process()
""")


def _torchrun(args: list[str], cwd, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _two_ranks_and_one(script_text: str, tmp_path, name: str, args: list[str], single_args: list[str] | None = None):
    """Run ``script_text`` under torchrun on 2 ranks, then as one process (``single_args``: its arguments)."""
    script = tmp_path / name
    script.write_text(script_text)
    _torchrun([str(script), *args], cwd=tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    subprocess.run([sys.executable, str(script), *(single_args or args)], check=True, env=env, cwd=tmp_path,
                   timeout=600)


@pytest.mark.parametrize("agg,parallel", [("token-mean", "ddp"), ("seq-mean", "ddp"), ("token-mean", "fsdp"),
                                          ("seq-mean", "fsdp")])
def test_two_rank_update_equals_single_process_update(tmp_path, agg, parallel):
    out = tmp_path / "o"
    out.mkdir()
    _two_ranks_and_one(UPDATE_SCRIPT, tmp_path, "update.py", [str(out), agg, parallel], [str(out), agg, "ddp"])
    one = torch.load(out / "params_w1_r0.pt")
    r0, r1 = torch.load(out / "params_w2_r0.pt"), torch.load(out / "params_w2_r1.pt")
    assert torch.equal(r0, r1), "replicas diverged"
    init = torch.cat([p.detach().reshape(-1) for p in _init_params()])
    assert not torch.equal(one, init), "the update did not move the weights (test cannot fail)"
    torch.testing.assert_close(r0, one, rtol=1e-5, atol=1e-6)


def _init_params():
    from l2t_ext.lm import tiny_qwen2
    from l2t_ext.tasks import arith

    return tiny_qwen2(arith.tokenizer(), hidden_size=32, num_layers=2, seed=0).parameters()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_train_and_resume_matches_uninterrupted(tmp_path, parallel):
    from safetensors.torch import load_file

    common = ["-m", "l2t_ext.cli", "train", "--preset", "tiny-arith", "--method", "l2t", "--steps", "3",
              "--sft_steps", "5", "--eval_problems", "0", "--save_every", "1", "--hidden_size", "32",
              "--num_layers", "2", "--max_new_tokens", "24", "--prompts_per_step", "2", "--group_size", "4",
              "--rank", "4", "--parallel", parallel, "--refresh_every", "2"]
    if parallel == "fsdp":  # the probe path a GPU takes by default, here with sharded weights
        common += ["--reward_probes", "packed"]
    a, b = tmp_path / "a", tmp_path / "b"
    # a's last step evaluates (fsdp: rank 0 on the gathered weights, then after the group is gone)
    _torchrun(common + ["--out", str(a), "--eval_every", "3", "--eval_problems", "2", "--eval_samples", "1"],
              cwd=tmp_path)
    rows = [json.loads(x) for x in open(a / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 alone writes metrics
    assert all(math.isfinite(v) for r in rows for v in r.values())
    state = torch.load(a / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=False)
    assert len(state["rng_per_rank"]) == 2
    assert (a / "evals.jsonl").exists() and (a / "eval.json").exists()
    if parallel == "fsdp":  # the optimizer lives in the sharded state, covered by the manifest
        assert state["optimizer"] is None
        manifest = json.load(open(a / "checkpoints" / "step_000003" / "manifest.json"))["files"]
        assert any(k.startswith("dcp/") and k.endswith(".distcp") for k in manifest), manifest.keys()
        # the consolidated weights serve the single-process tools: l2t eval and l2t inspect read the fsdp run
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("WORLD_SIZE", None)
        for cmd in (["eval", "--model", str(a), "--eval_problems", "2", "--eval_samples", "1"],
                    ["inspect", str(a), "--prompts", "1", "--json", str(tmp_path / "inspect.json")]):
            res = subprocess.run([sys.executable, "-m", "l2t_ext.cli", *cmd], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, res.stderr[-3000:]
    _torchrun(common + ["--out", str(b), "--resume", str(a / "checkpoints" / "step_000002")], cwd=tmp_path)
    wa = load_file(a / "checkpoints" / "step_000003" / "model.safetensors")
    wb = load_file(b / "checkpoints" / "step_000003" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rb = [json.loads(x) for x in open(b / "metrics.jsonl")]
    assert rb[-1]["accuracy"] == rows[-1]["accuracy"] and rb[-1]["loss"] == rows[-1]["loss"]


def test_penalty_uses_one_fisher_over_all_ranks(tmp_path):
    """The reward of an episode does not depend on how the batch is split: two ranks holding 3 rows each give
    the penalties a single process computes for all 6 rows (raw and normalised)."""
    _two_ranks_and_one(REWARD_SCRIPT, tmp_path, "reward.py", [str(tmp_path)])
    one = torch.load(tmp_path / "r0_w1.pt")
    parts = [torch.load(tmp_path / f"r{r}_w2.pt") for r in (0, 1)]
    for key in ("P", "Pbar"):
        K = one[key].shape[1]
        two = torch.cat([torch.nn.functional.pad(p[key], (0, K - p[key].shape[1])) for p in parts])
        torch.testing.assert_close(two, one[key], rtol=1e-5, atol=1e-7)
    assert one["valid"].sum() > 6 and (one["P"][one["valid"]] > 0).all()


FISHER_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from torch.distributed.tensor import DTensor
    from l2t_ext.lm import tiny_qwen2
    from l2t_ext.reward import FisherTracker
    from l2t_ext.rl.builders import exit_process
    from l2t_ext.tasks import arith

    out = sys.argv[1]
    model = tiny_qwen2(arith.tokenizer(), hidden_size=32, num_layers=3, seed=0)
    gathered = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        from l2t_ext.rl import sharding
        dist.init_process_group("gloo")
        sharding.shard(model)
        full = DTensor.full_tensor
        def counting(self, *a, **k):
            gathered.append(tuple(self.shape))
            return full(self, *a, **k)
        DTensor.full_tensor = counting
    tr = FisherTracker(model, rank=4, seed=0)
    torch.save({"bases": tr.state_dict(), "gathered": gathered, "proxy": tr.proxy()},
               os.path.join(out, f"fisher_{os.environ.get('RANK', 'single')}.pt"))
    exit_process()
""")


def test_fsdp_svd_refresh_gathers_only_the_tracked_weights(tmp_path):
    """Under FSDP the tracker's bases (and proxy) equal the single-process ones, and building them gathered only
    the tracked last-block weights (4 matrices), never the other layers' shards."""
    _two_ranks_and_one(FISHER_SCRIPT, tmp_path, "fisher.py", [str(tmp_path)])
    from l2t_ext.lm import tiny_qwen2
    from l2t_ext.reward.fisher import default_layers
    from l2t_ext.tasks import arith

    model = tiny_qwen2(arith.tokenizer(), hidden_size=32, num_layers=3, seed=0)
    mods = dict(model.named_modules())
    want = [tuple(mods[n].weight.shape) for n in default_layers(model)]
    assert len(want) == 4
    one = torch.load(tmp_path / "fisher_single.pt")
    assert one["gathered"] == []
    for r in (0, 1):
        two = torch.load(tmp_path / f"fisher_{r}.pt")
        # refresh gathers o/gate/up/down of the last block; proxy() gathers the same four again
        assert sorted(two["gathered"]) == sorted(want * 2), two["gathered"]
        for k, v in one["bases"].items():
            assert torch.equal(two["bases"][k], v) if torch.is_tensor(v) else two["bases"][k] == v, k
        torch.testing.assert_close(two["proxy"], one["proxy"], rtol=0, atol=0)


def test_fsdp_without_a_distributed_launch_is_refused_before_any_work(tmp_path, monkeypatch):
    from l2t_ext.errors import InputError
    from l2t_ext.rl.config import preset
    from l2t_ext.rl.trainer import Trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    cfg = preset("tiny-arith").override(["parallel=fsdp", f"out={out}", "sft_steps=0"])
    with pytest.raises(InputError, match="parallel=fsdp.*torchrun"):
        Trainer(cfg)
    assert not out.exists()
    with pytest.raises(InputError, match="parallel must be"):
        preset("tiny-arith").override(["parallel=zero3"])


def test_fsdp_needs_a_list_of_transformer_blocks():
    from l2t_ext.errors import InputError
    from l2t_ext.lm import tiny_qwen2
    from l2t_ext.rl.sharding import transformer_blocks
    from l2t_ext.tasks import arith

    model = tiny_qwen2(arith.tokenizer(), hidden_size=32, num_layers=3, seed=0)
    assert transformer_blocks(model) is model.model.layers
    with pytest.raises(InputError, match="Sequential has no list of transformer blocks"):
        transformer_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("code", [0, 3])
def test_exit_process_leaves_the_group_only_on_success_and_skips_finalisation(tmp_path, monkeypatch, code):
    """Under a launcher (WORLD_SIZE > 1) ``exit_process`` ends with ``os._exit(code)``; a successful rank first
    leaves the process group, a failing one exits without waiting in a barrier. Without a launcher it is
    ``sys.exit(code)``."""
    import torch.distributed as dist

    from l2t_ext.rl.builders import exit_process

    class Exited(Exception):
        pass

    def fake_exit(c):
        raise Exited(c)

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setattr(os, "_exit", fake_exit)
        with pytest.raises(Exited) as e:
            exit_process(code)
        assert e.value.args == (code,)
        assert dist.is_initialized() == (code != 0)
        monkeypatch.setenv("WORLD_SIZE", "1")
        with pytest.raises(SystemExit) as s:
            exit_process(code)
        assert s.value.code == code and dist.is_initialized() == (code != 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
