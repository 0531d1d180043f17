"""The PPO loss: its gradient against finite differences for both aggregations, the k3 KL estimator, clip
statistics."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from l2t_ext.rl.loss import k3_kl, ppo_loss  # noqa: E402


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_ppo_loss_gradient_matches_finite_differences(agg):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 5, generator=g, dtype=torch.float64)
    logp = (old + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    ref = old + 0.1 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3

    def f(x):
        return ppo_loss(x, old, adv, mask, 0.2, 0.28, agg, ref, kl_coef=0.05)[0]

    f(logp).backward()
    num = torch.zeros_like(logp)
    h = 1e-6
    for i in range(3):
        for j in range(5):
            e = torch.zeros_like(logp)
            e[i, j] = h
            num[i, j] = (f(logp.detach() + e) - f(logp.detach() - e)) / (2 * h)
    assert torch.allclose(logp.grad, num, atol=1e-6)


def test_k3_kl_properties():
    x = torch.randn(100)
    assert (k3_kl(x, x) == 0).all()
    assert (k3_kl(x, x + torch.randn(100)) >= 0).all()


def test_ppo_loss_clip_stats():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    loss, st = ppo_loss(logp, old, adv, torch.ones(1, 4, dtype=torch.bool), 0.2, 0.28)
    # clipped: ratio 1.5 with A>0 (above 1.28) and ratio 0.5 with A<0 (below 0.8)
    assert st["clip_frac"] == 0.5
    assert math.isclose(float(loss), -(1.0 + 1.28 - 0.8 + 1.1) / 4, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------- config
