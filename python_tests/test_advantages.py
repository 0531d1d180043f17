"""Advantages (group normalisation, the length-penalised baseline, L2T's per-token process advantages, GAE)
against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from _cases import DEVICES

pytest.importorskip("transformers")

from l2t_ext.rl import advantages as A  # noqa: E402
from l2t_ext.rl.advantages import EPS  # noqa: E402


# ------------------------------------------------------------------------------------------- advantages
def test_group_normalize_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    a = A.group_normalize(r, 3, eps=0.0)
    # group 1: mean 1/3, std sqrt(2)/3; group 2: mean 2/3, same std
    s = math.sqrt(2) / 3
    want = torch.tensor([2 / 3 / s, -1 / 3 / s, -1 / 3 / s, -2 / 3 / s, 1 / 3 / s, 1 / 3 / s])
    assert torch.allclose(a, want, atol=1e-6)
    assert torch.equal(A.group_normalize(torch.ones(4), 2), torch.zeros(4))  # a tied group gives no signal


def test_length_penalized_hand_computed():
    r = torch.tensor([1.0, 1.0])
    lengths = torch.tensor([10.0, 30.0])  # group mean 20, std 10 -> z = -1, +1
    assert torch.allclose(A.length_penalized(r, lengths, 2, coef=0.5), torch.tensor([1.5, 0.5]), atol=1e-6)


def test_gated_length_penalty_only_charges_correct_answers():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    lengths = torch.tensor([10.0, 30.0, 5.0, 20.0, 50.0, 1.0, 2.0, 3.0])
    # group 1: correct lengths 10, 30, 20 -> mean 20, std sqrt(200/3); the wrong answer pays nothing
    z = (torch.tensor([10.0, 30.0, 20.0]) - 20.0) / (200.0 / 3) ** 0.5
    # group 2 has one correct answer: no length term
    want = torch.tensor([1 - 0.5 * z[0], 1 - 0.5 * z[1], 0.0, 1 - 0.5 * z[2], 1.0, 0.0, 0.0, 0.0])
    got = A.length_penalized(r, lengths, 4, coef=0.5, gated=True)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(A.length_penalized(r, lengths, 4, coef=0.5), want, atol=1e-3)  # ungated differs


def test_process_token_advantages_hand_computed():
    # one group of 2 rollouts; rollout 0 has 2 valid episodes, rollout 1 has 1
    r_prg = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    valid = torch.tensor([[True, True], [True, False]])
    # valid values 1, 3, 2: mean 2, population std sqrt(2/3)
    s = math.sqrt(2 / 3)
    ep = torch.tensor([[-1, 0, 0, 1, -1], [-1, 0, 0, -1, -1]])
    for norm, n in (("mean_std", {(0, 0): -1 / s, (0, 1): 1 / s, (1, 0): 0.0}),
                    ("std", {(0, 0): 1 / s, (0, 1): 3 / s, (1, 0): 2 / s})):
        adv = A.process_token_advantages(r_prg, valid, ep, group_size=2, eps=0.0, norm=norm)
        want = torch.tensor([[0, n[0, 0] + n[0, 1], n[0, 0] + n[0, 1], n[0, 1], 0],
                             [0, n[1, 0], n[1, 0], 0, 0]])
        assert torch.allclose(adv, want.float(), atol=1e-6), norm
    with pytest.raises(ValueError, match="norm must be"):
        A.process_token_advantages(r_prg, valid, ep, group_size=2, norm="z")


@pytest.mark.parametrize("norm", ["std", "mean_std"])
def test_tied_groups_get_no_process_advantage(norm):
    # groups of 2 rollouts x 2 episodes: identical rollouts (equal rewards, up to float32 rounding), a group with
    # a single valid episode, and a group with a real spread that keeps its normalised values
    r_prg = torch.tensor([[-0.6, -0.6], [-0.6, -0.6],
                          [0.3, 0.0], [0.0, 0.0],
                          [1.0, 3.0], [2.0, 0.0]])
    r_prg[1, 1] += 3e-8  # rounding-level spread: std / rms ~ 2e-8
    valid = torch.tensor([[True, True], [True, True], [True, False], [False, False], [True, True], [True, False]])
    normed, suffix = A.normalized_episode_rewards(r_prg, valid, group_size=2, eps=EPS, norm=norm)
    assert torch.equal(normed[:4], torch.zeros(4, 2)) and torch.equal(suffix[:4], torch.zeros(4, 2))
    s = math.sqrt(2 / 3)  # group 3: values 1, 3, 2 (as in the hand-computed test above)
    want = torch.tensor([[-1, 1], [0, 0]]) / s if norm == "mean_std" else torch.tensor([[1, 3], [2, 0]]) / s
    torch.testing.assert_close(normed[4:], want.float(), rtol=1e-5, atol=1e-5)


def test_near_constant_group_is_scaled_by_the_floor():
    # a per-episode count with almost no information gain: rewards -0.6 +- 1e-4, std / rms ~ 1e-4 > TIE_RTOL;
    # the std alone would scale them to ~ -6000, the floor to ~ -0.6 / (0.1 * 0.6) = -10
    r_prg = torch.tensor([[-0.6001, -0.5999], [-0.6, -0.6002]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    normed, _ = A.normalized_episode_rewards(r_prg, valid, group_size=2, eps=EPS, norm="std")
    rms = r_prg.square().mean().sqrt()
    torch.testing.assert_close(normed, r_prg / (A.FLOOR_RTOL * rms + EPS))
    # above the floor nothing changes: the hand-computed test's group has std / rms = 0.38
    spread = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    ok = torch.tensor([[True, True], [True, False]])
    got, _ = A.normalized_episode_rewards(spread, ok, group_size=2, eps=EPS, norm="std")
    torch.testing.assert_close(got, spread / (spread[ok].std(unbiased=False) + EPS) * ok, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_token_rewards_hand_computed(device):
    # PPO's token rewards: the sequence reward on each row's last loss position, alpha * r_prg[k] on the last
    # position of each valid episode k (row 1's episode 1 is not valid: no reward there)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool, device=device)
    ep = torch.tensor([[-1, 0, 0, 1, 1, -1], [-1, 0, 1, -1, -1, -1]], device=device)
    r_prg = torch.tensor([[0.2, 0.4], [0.3, 0.7]], device=device)
    valid = torch.tensor([[True, True], [True, False]], device=device)
    seq = torch.tensor([1.0, 0.5], device=device)
    got = A.token_rewards(seq, r_prg, valid, ep, mask, alpha=0.5)
    want = torch.tensor([[0, 0, 0.1, 0, 1.2, 0], [0, 0.15, 0.5, 0, 0, 0]])
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), want)
    outcome_only = torch.tensor([[0, 0, 0, 0, 1.0, 0], [0, 0, 0.5, 0, 0, 0]])
    torch.testing.assert_close(A.token_rewards(seq, None, None, ep, mask, alpha=0.5).cpu(), outcome_only)


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    g, lam = 0.9, 0.8
    d2 = 1.0 - 0.4
    d1 = 0.0 + g * 0.4 - 0.2
    d0 = 0.0 + g * 0.2 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = A.gae(rewards, values, mask, g, lam)
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0]]), atol=1e-6)


# ------------------------------------------------------------------------------------------- loss
