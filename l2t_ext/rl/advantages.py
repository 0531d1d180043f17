"""Advantages for the loop's methods (paper Eq. 5 and Algorithm 1; docs/architecture.md, "One training step").

Rollouts are laid out group-major: rows g*G .. g*G + G - 1 answer prompt g.
- grpo:            A = (r_out - mean_group) / (std_group + eps), the same for every response token.
- length_penalty:  r = r_out - coef * (len - mean_group(len)) / (std_group(len) + eps), then group-normalised.
- l2t:             A_t = A_out + alpha * A_prg_t: the group's valid episode rewards r_prg are normalised over
                   all valid episodes of the group's G rollouts; a token of episode k gets the sum of the
                   normalised rewards of episodes k..K of its rollout; final-answer tokens get 0.
                   ``norm="std"`` (default) divides by the group's std only (floored, and 0 for a tied group:
                   ``normalized_episode_rewards``); ``norm="mean_std"`` also subtracts
                   the group mean, which gives every episode a bonus of -mean/std: when most episodes cost more
                   than they gain (mean < 0), a rollout's advantage then grows with its number of episodes
                   (measured on the demo: within-group corr(length, advantage) +0.97), i.e. it rewards verbosity.
- ppo (any method): token rewards (outcome on the last response token, alpha * r_prg on each episode's last
                   token for l2t, the length term on the last token for length_penalty) and GAE over a value
                   head.
std is the population standard deviation of the group.
"""

from __future__ import annotations

import torch

EPS = 1e-6
# Process-reward normalisation of near-constant groups (normalized_episode_rewards). A group's episode rewards
# whose std is within TIE_RTOL of their root mean square are tied (float32 rounding of equal rewards leaves
# ~1e-7); otherwise the std used is at least FLOOR_RTOL x their RMS, so that no normalised reward exceeds
# 1 / FLOOR_RTOL x |r| / RMS (std alone turned a near-constant group's rewards into values of 1e3-1e5).
TIE_RTOL = 1e-4
FLOOR_RTOL = 0.1


def group_normalize(x: torch.Tensor, group_size: int, eps: float = EPS) -> torch.Tensor:
    """(N,) -> (N,) normalised within consecutive groups of ``group_size``."""
    g = x.reshape(-1, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + eps)).reshape(-1)


def length_penalized(r_out: torch.Tensor, lengths: torch.Tensor, group_size: int, coef: float,
                     gated: bool = False) -> torch.Tensor:
    """Outcome minus ``coef`` x a group-normalised length term (per rollout).

    ``gated=False``: lengths are normalised over the whole group and every answer pays. ``gated=True``: only
    correct answers (``r_out > 0``) pay, with their lengths normalised over the group's correct answers (a group
    with fewer than two correct answers has no length term), so a wrong answer is never pushed shorter."""
    if not gated:
        return r_out - coef * group_normalize(lengths.to(r_out.dtype), group_size)
    ok = (r_out > 0).reshape(-1, group_size).to(r_out.dtype)
    ln = lengths.to(r_out.dtype).reshape(-1, group_size)
    n = ok.sum(1, keepdim=True)
    mean = (ln * ok).sum(1, keepdim=True) / n.clamp(min=1)
    std = (((ln - mean) ** 2 * ok).sum(1, keepdim=True) / n.clamp(min=1)).sqrt()
    z = torch.where((ok > 0) & (n >= 2), (ln - mean) / (std + EPS), torch.zeros_like(ln))
    return r_out - coef * z.reshape(-1)


def normalized_episode_rewards(r_prg: torch.Tensor, valid: torch.Tensor, group_size: int, eps: float = EPS,
                               norm: str = "std") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) episode rewards normalised over each group's valid episodes (``norm``: "std" or "mean_std"; 0
    where ~valid) and their suffix sums over episodes k..K of each rollout. A tied group (fewer than two valid
    episodes, or rewards equal up to ``TIE_RTOL`` of their root mean square) gets 0, as a tied group gets no
    outcome advantage: dividing by its rounding-level std made advantages of up to r / eps. The std is floored
    at ``FLOOR_RTOL`` x the rewards' RMS (a near-constant group: a per-episode count with no information
    gain), which leaves every group whose spread is above the floor unchanged."""
    if norm not in ("std", "mean_std"):
        raise ValueError(f"norm must be 'std' or 'mean_std', got {norm!r}")
    B, K = r_prg.shape
    vf = valid.to(r_prg.dtype)
    rg, vg = r_prg.reshape(-1, group_size, K), vf.reshape(-1, group_size, K)
    n = vg.sum((1, 2), keepdim=True)
    cnt = n.clamp(min=1)
    mean = (rg * vg).sum((1, 2), keepdim=True) / cnt
    std = (((rg - mean) ** 2 * vg).sum((1, 2), keepdim=True) / cnt).sqrt()
    rms = ((rg * rg * vg).sum((1, 2), keepdim=True) / cnt).sqrt()
    tied = (n < 2) | (std <= TIE_RTOL * rms)
    scale = torch.maximum(std, FLOOR_RTOL * rms)
    centred = rg - mean if norm == "mean_std" else rg  # the std is the same either way
    normed = torch.where(tied, torch.zeros_like(rg), centred / (scale + eps) * vg).reshape(B, K)
    return normed, normed.flip(1).cumsum(1).flip(1)  # suffix[b, k] = sum_{j >= k} normed[b, j]


def process_token_advantages(r_prg: torch.Tensor, valid: torch.Tensor, episode_ids: torch.Tensor,
                             group_size: int, eps: float = EPS, norm: str = "std") -> torch.Tensor:
    """(B, L) process advantage: every token of episode k gets the suffix sum over episodes k..K of its
    rollout's normalised episode rewards (``normalized_episode_rewards``); tokens outside episodes get 0."""
    _, suffix = normalized_episode_rewards(r_prg, valid, group_size, eps, norm)
    return episode_token_values(suffix, episode_ids)


def episode_token_values(per_episode: torch.Tensor, episode_ids: torch.Tensor) -> torch.Tensor:
    """(B, L): token t gets ``per_episode[b, episode_ids[b, t]]``; tokens outside episodes (-1) get 0."""
    K = per_episode.shape[1]
    idx = episode_ids.clamp(min=0, max=max(K - 1, 0))
    out = per_episode.gather(1, idx) if K else torch.zeros_like(episode_ids, dtype=per_episode.dtype)
    return torch.where(episode_ids >= 0, out, torch.zeros_like(out))


def token_rewards(seq_reward: torch.Tensor, r_prg: torch.Tensor | None, valid: torch.Tensor | None,
                  episode_ids: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B, L) PPO token rewards: the sequence reward on each row's last masked position, plus
    ``alpha * r_prg[k]`` on the last position of episode k (l2t). ``episode_ids``/``mask`` are on the predicting
    positions."""
    B, L = mask.shape
    pos = torch.arange(L, device=mask.device)
    out = torch.zeros(B, L, device=mask.device)
    rows = torch.arange(B, device=mask.device)  # on the device: it is indexed with device masks below
    last = (mask.long() * pos).max(1).values
    out[rows, last] = seq_reward.float()
    if r_prg is not None:
        for k in range(r_prg.shape[1]):
            end = torch.where(episode_ids == k, pos, -1).max(1).values
            ok = (end >= 0) & valid[:, k]
            out[rows[ok], end[ok]] += alpha * r_prg[ok, k]
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens. rewards, values, mask: (B, L), mask True on each
    row's contiguous response; the episode ends after the last response token (V = 0 beyond).
    Returns (advantages, returns), 0 outside the mask."""
    B, L = rewards.shape
    m = mask.to(rewards.dtype)
    zero = torch.zeros(B, 1, dtype=rewards.dtype, device=rewards.device)
    m_next = torch.cat([m[:, 1:], zero], 1)
    v_next = torch.cat([values[:, 1:], zero], 1) * m_next
    delta = (rewards + gamma * v_next - values) * m
    adv = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in range(L - 1, -1, -1):
        running = delta[:, t] + gamma * lam * running * m_next[:, t]
        adv[:, t] = running * m[:, t]
    return adv, (adv + values) * m
