"""Rewards: the contract (:mod:`.base`), CLIP/PickScore/HPSv2.1 models, analytic rewards, a registry."""
from leapalign.rewards.base import RewardFn, RewardNotDifferentiableError, call_reward
from leapalign.rewards.composite import CompositeReward, RewardTerm
from leapalign.rewards.registry import REWARD_NAMES, UnknownRewardError, build_reward, build_rewards

__all__ = [
    "RewardFn",
    "RewardNotDifferentiableError",
    "call_reward",
    "CompositeReward",
    "RewardTerm",
    "REWARD_NAMES",
    "UnknownRewardError",
    "build_reward",
    "build_rewards",
]
