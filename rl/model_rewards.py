"""Trained models as reward functions, with the rule rewards' interface:

    fn(prompts, completions, *, prompt_ids=None, **columns) -> list[float | None]

`ScalarReward` scores each completion with a Bradley-Terry reward model (rl/reward_eval.py);
`JudgeReward` asks a generative judge (rl/judge.py) for a critique and a score. Both read a
completion as the assistant turn that follows its prompt: a chat task's `prompt_ids` column
when there is one (rl/cold_start.chat_tasks), else the prompt text as one user turn. The
completion's text is parsed back into reasoning and answer (`chat.parse_assistant`), so a
completion in the model's layout is scored on exactly the ids the reward model was trained on.
`scope` picks what is read: the whole response, or only the summary after `</think>` (R1's
stage 4 judges helpfulness on the summary and harmlessness on everything).

Both run batched and jitted: fixed batch rows, lengths rounded up to a bucket, so a GRPO run
compiles a handful of shapes. A sequence longer than the model's context keeps its end (the
response and its end-of-sentence token, which the scalar head reads).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from rl import reward_model
from rl.preferences import Scope
from rl.reward_eval import TrainedRewardModel
from train.chat import Layout, Message, Role, assistant_ids, parse_assistant, render
from train.tokenizer import Tokenizer


def _bucket(n: int, size: int = 64) -> int:
    return -(-n // size) * size


def response_ids(
    prompt: str,
    completion: str,
    tokenizer: Tokenizer,
    *,
    layout: Layout,
    scope: Scope,
    prompt_ids: Sequence[int] | None = None,
) -> list[int]:
    """The ids of prompt + completion as the conversation a reward model reads: the
    completion parsed into the layout's reasoning and answer, only the answer under
    `Scope.SUMMARY`, closed by end-of-sentence (a blank completion is that token alone)."""
    if prompt_ids is None:
        turn = [Message(Role.USER, prompt)]
        prompt_ids = render(turn, tokenizer, layout=layout, add_generation_prompt=True).ids
    message = parse_assistant(completion, tokenizer, layout)
    if message is None:
        return [*map(int, prompt_ids), tokenizer.eos_id]
    if scope is Scope.SUMMARY:
        message = Message(Role.ASSISTANT, message.content)
    return [*map(int, prompt_ids), *assistant_ids(message, tokenizer, layout)]


class ScalarReward:
    """A trained scalar reward model as a reward function (its raw score, unnormalised)."""

    def __init__(self, rm: TrainedRewardModel, *, scope: Scope | None = None, batch_size: int = 16):
        self.rm = rm
        self.scope = rm.data.scope if scope is None else scope
        self.layout = rm.data.layout
        self.batch_size = batch_size
        self.__name__ = f"reward_model_{self.scope.value}"
        cfg = rm.cfg
        self._score = jax.jit(lambda p, rb, rows: reward_model.scores(cfg, p, rb, rows))

    def ids(self, prompt: str, completion: str, prompt_ids=None) -> list[int]:
        ids = response_ids(
            prompt, completion, self.rm.tokenizer, layout=self.layout, scope=self.scope,
            prompt_ids=prompt_ids,
        )  # fmt: skip
        return ids[-self.rm.cfg.max_seq_len :]

    def score_ids(self, rows: Sequence[Sequence[int]]) -> list[float]:
        """Rewards of token rows (each a whole conversation ending in end-of-sentence)."""
        out: list[float] = []
        B = self.batch_size
        for start in range(0, len(rows), B):
            chunk = [np.asarray(r, np.int32) for r in rows[start : start + B]]
            length = min(_bucket(max(map(len, chunk))), self.rm.cfg.max_seq_len)
            batch = reward_model.pad_rows(chunk + [chunk[0][:0]] * (B - len(chunk)), length)
            rewards = self._score(self.rm.params, self.rm.router_bias, batch)
            out += np.asarray(jax.device_get(rewards))[: len(chunk)].tolist()
        return out

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        **_,
    ) -> list[float]:
        heads = prompt_ids if prompt_ids is not None else [None] * len(prompts)
        rows = [self.ids(p, c, h) for p, c, h in zip(prompts, completions, heads, strict=True)]
        return self.score_ids(rows)
