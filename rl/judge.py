"""A generative reward model: a judge fine-tuned (train/sft.py) to critique a response inside
`<think>` and then give a score, parsed into a reward.

V3's reward models were trained on preference data holding the chain of thought that leads
to each reward as well as the reward. The judge here reads one question and one response in a
user turn and answers in the THINK layout:

    <think>
    It answers 48, but 56 - 3 = 53.
    </think>

    Score: 0

Scores are 0 (wrong, unfinished or off-format), 1 (right but rambling) and 2 (right and
concise); the reward is score / 2. Output that does not end in exactly `Score: N` after a
critique is no opinion (None), never an error. The embedded training data comes from the
preference pairs (rl/preferences.py): each response of a pair gets its kind's critique and
score, so a judge that orders scores correctly also ranks the pair.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

import model
from model import ModelConfig
from rl import general
from rl.evaluate import decode_completions
from rl.preferences import Pair, Scope
from train.chat import (
    Layout,
    Message,
    Role,
    assistant_ids,
    last_user_text,
    parse_assistant,
    render,
)
from train.tokenizer import Tokenizer

JUDGE_LAYOUT = Layout.THINK
MAX_SCORE = 2
SCORES = {"chosen": 2, "rambling": 1, "mistake": 0, "truncated": 0, "format": 0}
_VERDICT = re.compile(r"\s*Score: ([0-9])\s*")


def judge_prompt(question: str, response: str) -> Message:
    """The user turn that asks the judge about one response to one question."""
    return Message(
        Role.USER,
        f"Judge the response to the question.\nQuestion: {question}\nResponse:\n{response}\n"
        f"Critique it, then give Score: 0 to {MAX_SCORE}.",
    )


def response_text(message: Message, tokenizer: Tokenizer, layout: Layout) -> str:
    """A response as the text a policy's completion decodes to (its tags included)."""
    return tokenizer.decode(assistant_ids(message, tokenizer, layout)[:-1])


def critique(pair: Pair, which: str) -> tuple[str, int]:
    """(critique, score) of the pair's chosen or rejected response, from its kind (general
    prompts' pairs, whose kind is a flaw: rl/general.critique)."""
    if pair.kind in general.FLAWS:
        return general.critique(pair, which)
    answer = pair.chosen.content
    kind = "chosen" if which == "chosen" else pair.kind
    if kind == "chosen":
        text = f"It reaches {answer}, the checks agree, and the summary gives it."
    elif kind == "rambling":
        text = f"It reaches {answer}, but it says its checks again and again."
    elif kind == "mistake":
        text = f"It answers {pair.rejected.content}, but the right answer is {answer}."
    elif kind == "truncated":
        text = "It stops before it gives an answer."
    elif kind == "format":
        text = "Its reasoning is outside the think tags and it has no summary."
    else:
        raise ValueError(f"no critique for a pair of kind {pair.kind!r}")
    return text, SCORES[kind]


def judge_conversations(
    pairs: Sequence[Pair], tokenizer: Tokenizer, *, layout: Layout = Layout.READABLE
) -> list[list[Message]]:
    """Two judge conversations per pair (its chosen and its rejected response), the responses
    shown as `layout` renders them."""
    out = []
    for pair in pairs:
        question = pair.prompt[-1].content
        for which in ("chosen", "rejected"):
            text, score = critique(pair, which)
            shown = response_text(getattr(pair, which), tokenizer, layout)
            verdict = Message(Role.ASSISTANT, f"Score: {score}", reasoning=text)
            out.append([judge_prompt(question, shown), verdict])
    return out


def parse_verdict(text: str, tokenizer: Tokenizer) -> float | None:
    """score / MAX_SCORE of a judge's output (a critique in <think>, then `Score: N`), or
    None when it does not have that form."""
    message = parse_assistant(text, tokenizer, JUDGE_LAYOUT)
    if message is None or message.reasoning is None:
        return None
    match = _VERDICT.fullmatch(message.content)
    if match is None or int(match[1]) > MAX_SCORE:
        return None
    return int(match[1]) / MAX_SCORE


class JudgeReward:
    """A fine-tuned judge as a reward function: greedy critique + score per completion.

    fn(prompts, completions, *, question=None, **_) -> list[float | None]; the question is
    the `question` column when there is one, else the prompt's last user turn. `layout` is
    the policy's (how its completions are parsed for `Scope.SUMMARY`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        variables: dict,
        tokenizer: Tokenizer,
        *,
        layout: Layout = Layout.READABLE,
        scope: Scope = Scope.RESPONSE,
        max_new_tokens: int = 96,
        batch_size: int = 64,
    ):
        self.cfg, self.variables, self.tokenizer = cfg, variables, tokenizer
        self.layout, self.scope = layout, scope
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.__name__ = f"judge_{scope.value}"

    def prompt_ids(self, question: str, response: str) -> list[int]:
        """The judge's prompt for one response: its training conversations' user turn."""
        turn = [judge_prompt(question, response)]
        rendered = render(turn, self.tokenizer, layout=JUDGE_LAYOUT, add_generation_prompt=True)
        return rendered.ids.tolist()

    def judge(self, questions: Sequence[str], responses: Sequence[str]) -> list[str]:
        """The judge's greedy outputs for (question, response) pairs."""
        prompts = [self.prompt_ids(q, r) for q, r in zip(questions, responses, strict=True)]
        outputs: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            out = model.generate(
                self.cfg, self.variables, prompts[start : start + self.batch_size],
                max_new_tokens=self.max_new_tokens, temperature=0.0,
                stop_tokens=[self.tokenizer.eos_id],
            )  # fmt: skip
            outputs += decode_completions(self.tokenizer, out.completions())
        return outputs

    def shown(self, completion: str) -> str:
        if self.scope is Scope.SUMMARY:
            message = parse_assistant(completion, self.tokenizer, self.layout)
            return "" if message is None else message.content
        return completion

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        question: Sequence[str] | None = None,
        **_,
    ) -> list[float | None]:
        questions = question or [last_user_text(p, self.tokenizer) for p in prompts]
        outputs = self.judge(questions, [self.shown(c) for c in completions])
        return [parse_verdict(o, self.tokenizer) for o in outputs]


def judge_accuracy(judge: JudgeReward, pairs: Sequence[Pair]) -> dict[str, float]:
    """On pairs the judge never saw: verdict_accuracy (its score is the response's), pairwise
    accuracy (chosen scored above rejected; a tie or no verdict is wrong), overall and per
    kind, parse_rate (outputs with a verdict)."""
    questions, responses, labels = [], [], []
    for pair in pairs:
        for which in ("chosen", "rejected"):
            questions.append(pair.prompt[-1].content)
            responses.append(response_text(getattr(pair, which), judge.tokenizer, judge.layout))
            labels.append(critique(pair, which)[1] / MAX_SCORE)
    outputs = judge.judge(questions, responses)
    verdicts = [parse_verdict(o, judge.tokenizer) for o in outputs]
    got = np.array([np.nan if v is None else v for v in verdicts])
    chosen, rejected = got[0::2], got[1::2]
    out = {
        "verdict_accuracy": float(np.mean(got == np.asarray(labels))),
        "pairwise_accuracy": float(np.mean(chosen > rejected)),  # NaN compares False
        "parse_rate": float(np.mean(np.isfinite(got))),
    }
    kinds = np.asarray([pair.kind for pair in pairs])
    for kind in sorted(set(kinds) - {""}):
        out[f"pairwise_accuracy_{kind}"] = float(np.mean((chosen > rejected)[kinds == kind]))
    return out
