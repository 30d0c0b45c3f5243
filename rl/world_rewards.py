"""The R1 pipeline's reward functions over the embedded world's mixed tasks (rl/world.py),
each routed by the task's `kind` (rl/task_mix.py):

    accuracy   arithmetic: the integer; countdown: the expression; code: the tests passed
    format     reasoning tasks: R1's tags, reasoning then summary
    language   reasoning tasks: share of the reasoning in the prompt's script (R1)
    helpful    helpful prompts: a reward model on the summary only (R1's stage 4)
    harmless   harmful prompts: a reward model on the whole response, reasoning included
    general    general prompts: the rule check (rl/general.py), for evaluation only

General prompts are scored by the reward model trained for their category; rule rewards give
them no opinion (None), as the reward models give reasoning tasks none.
"""

from __future__ import annotations

from collections.abc import Mapping

from rl.code_reward import code_execution
from rl.general import general_rule
from rl.model_rewards import ScalarReward
from rl.preferences import Scope
from rl.reward_eval import TrainedRewardModel
from rl.rewards import (
    RewardFn,
    countdown_reward,
    format_reward,
    integer_accuracy,
    language_consistency,
)
from rl.task_mix import by_kind
from rl.world import GENERAL, REASONING

accuracy = by_kind(
    "accuracy",
    {"arithmetic": integer_accuracy, "countdown": countdown_reward, "code": code_execution},
)
format_ = by_kind("format", dict.fromkeys(REASONING, format_reward))
language = by_kind("language", dict.fromkeys(REASONING, language_consistency))
general = by_kind("general", dict.fromkeys(GENERAL, general_rule))


def model_rewards(
    helpful: TrainedRewardModel, harmless: TrainedRewardModel, batch_size: int = 16
) -> dict[str, RewardFn]:
    """{"helpful", "harmless"}: the two reward models as routed rewards, each with R1's
    scope (the summary for helpfulness, the whole response for harmlessness)."""
    summary = ScalarReward(helpful, scope=Scope.SUMMARY, batch_size=batch_size)
    response = ScalarReward(harmless, scope=Scope.RESPONSE, batch_size=batch_size)
    return {
        "helpful": by_kind("helpful", {"helpful": summary}),
        "harmless": by_kind("harmless", {"harmless": response}),
    }


def weighted(fns: Mapping[str, RewardFn], weights: Mapping[str, float]) -> dict:
    """The Weighted form {name: (fn, weight)} of the named rewards with a nonzero weight."""
    unknown = sorted(set(weights) - set(fns))
    if unknown:
        raise ValueError(f"reward weights name {unknown}, not among {sorted(fns)}")
    return {name: (fns[name], w) for name, w in weights.items() if w}


RULES = {"accuracy": accuracy, "format": format_, "language": language}
