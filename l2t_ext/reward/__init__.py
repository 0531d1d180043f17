"""The L2T dense process reward (docs/architecture.md, "The reward"): episodes, Jr estimators, the Fisher
tracker with its low-rank proxy, the compression penalty and the per-episode reward. Built on ``l2t_ext.ops``."""

from l2t_ext.reward.anatomy import episode_anatomy, format_summary, summarize
from l2t_ext.reward.dense import DenseProcessReward, RewardOutput
from l2t_ext.reward.episodes import boundary_positions, episode_counts, segment_episodes
from l2t_ext.reward.fisher import FisherTracker, compression_penalty, default_layers
from l2t_ext.reward.jr import FORCED_ANSWER_CUE, AnswerLikelihoodJr, CallableJr, ForcedAnswerJr, Rollouts

__all__ = ["segment_episodes", "episode_counts", "boundary_positions", "FisherTracker", "compression_penalty",
           "default_layers", "AnswerLikelihoodJr", "ForcedAnswerJr", "CallableJr", "Rollouts",
           "FORCED_ANSWER_CUE", "DenseProcessReward", "RewardOutput", "episode_anatomy", "summarize", "format_summary"]
