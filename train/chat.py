"""DeepSeek's chat format: conversations -> token ids + the SFT loss mask, and the same
template as a Hugging Face `chat_template` (Jinja) for `apply_chat_template`.

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜><think>
    {reasoning}
    </think>

    {answer}<｜end▁of▁sentence｜><｜User｜>...

The system prompt follows begin-of-sentence as plain text (DeepSeek has no system-role token);
every assistant turn ends with end-of-sentence. A turn without reasoning is its answer alone:
R1 gives simple queries no chain of thought. `Layout.READABLE` is R1's cold-start format, a
reasoning process and then a summary, the summary inside `<answer>` ... `</answer>`; those are
the tags the rule rewards (rl/rewards.py) read, so a cold-started model is scored by them as is.

Only assistant tokens are trained: the body of each assistant turn and its end-of-sentence
token (a model never trained on that token never stops), not `<｜Assistant｜>` itself, which is
the generation prompt. Every turn keeps its reasoning (DeepSeek's released template drops the
reasoning of earlier turns at inference; here training and template render the same text).

Text between special tokens is encoded as one piece, exactly as `transformers` splits a
rendered string on added tokens; special-token strings inside message text stay plain text
here (see train/tokenizer.py), while `apply_chat_template` would read them as tokens.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from train.tokenizer import Special, Tokenizer


class Role(enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class Layout(enum.Enum):
    """How an assistant turn with reasoning is laid out."""

    THINK = "think"  # DeepSeek-R1: <think>\nR\n</think>\n\nA
    READABLE = "readable"  # R1 cold start: <think>\nR\n</think>\n<answer>\nA\n</answer>


@dataclasses.dataclass(frozen=True)
class Message:
    """One turn. `reasoning` (Hugging Face's `reasoning_content`) is for assistant turns."""

    role: Role
    content: str
    reasoning: str | None = None

    def __post_init__(self):
        if not isinstance(self.role, Role):
            raise ValueError(f"role {self.role!r}: must be one of {[r.value for r in Role]}")
        if not isinstance(self.content, str) or not self.content.strip():
            raise ValueError(f"{self.role.value} message: content must be a non-empty string")
        if self.reasoning is not None:
            if self.role is not Role.ASSISTANT:
                raise ValueError(f"{self.role.value} message: only assistant turns have reasoning")
            if not isinstance(self.reasoning, str) or not self.reasoning.strip():
                raise ValueError(
                    "assistant message: reasoning must be a non-empty string or absent"
                )

    @classmethod
    def from_dict(cls, data: Mapping) -> Message:
        """From the usual messages layout: {role, content, optional reasoning_content}."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a message must be an object, got {type(data).__name__}")
        unknown = set(data) - {"role", "content", "reasoning_content"}
        if unknown:
            raise ValueError(f"message has unknown keys {sorted(unknown)}")
        roles = {r.value: r for r in Role}
        if data.get("role") not in roles:
            raise ValueError(f"unknown role {data.get('role')!r}: must be one of {list(roles)}")
        return cls(roles[data["role"]], data.get("content"), data.get("reasoning_content"))

    def to_dict(self) -> dict:
        out = {"role": self.role.value, "content": self.content}
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        return out


Conversation = Sequence[Message]


def check_conversation(messages: Conversation, *, needs_assistant: bool = True) -> None:
    """Raise ValueError unless `messages` is a well-formed conversation."""
    if not messages:
        raise ValueError("conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Message):
            raise ValueError(f"message {i} is a {type(message).__name__}, not a chat.Message")
        if message.role is Role.SYSTEM and i > 0:
            raise ValueError(f"message {i}: a system message may only come first")
    if needs_assistant and not any(m.role is Role.ASSISTANT for m in messages):
        raise ValueError("conversation has no assistant turn: nothing to train on")


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A rendered conversation: ids int32 [T]; trained bool [T], True on assistant tokens."""

    ids: np.ndarray
    trained: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _required(layout: Layout) -> tuple[Special, ...]:
    base = (Special.BOS, Special.EOS, Special.USER, Special.ASSISTANT)
    base += (Special.THINK_BEGIN, Special.THINK_END)
    if layout is Layout.READABLE:
        base += (Special.ANSWER_BEGIN, Special.ANSWER_END)
    return base


def _assistant_parts(message: Message, layout: Layout) -> list[Special | str]:
    """The body of an assistant turn, end-of-sentence included, as specials and text."""
    if message.reasoning is None:
        return [message.content, Special.EOS]
    parts = [Special.THINK_BEGIN, f"\n{message.reasoning}\n", Special.THINK_END]
    if layout is Layout.THINK:
        return [*parts, f"\n\n{message.content}", Special.EOS]
    return [*parts, "\n", Special.ANSWER_BEGIN, f"\n{message.content}\n", Special.ANSWER_END,
            Special.EOS]  # fmt: skip


def render(
    messages: Conversation,
    tokenizer: Tokenizer,
    *,
    layout: Layout = Layout.THINK,
    add_generation_prompt: bool = False,
) -> Rendered:
    """Token ids and the trained mask of a conversation; with `add_generation_prompt` it ends
    in `<｜Assistant｜>` (a prompt for generation; then no assistant turn is needed)."""
    check_conversation(messages, needs_assistant=not add_generation_prompt)
    tokenizer.require(*_required(layout))
    pieces: list[tuple[Special | str, bool]] = [(Special.BOS, False)]
    for message in messages:
        if message.role is Role.SYSTEM:
            pieces.append((message.content, False))
        elif message.role is Role.USER:
            pieces += [(Special.USER, False), (message.content, False)]
        else:
            pieces.append((Special.ASSISTANT, False))
            pieces += [(part, True) for part in _assistant_parts(message, layout)]
    if add_generation_prompt:
        pieces.append((Special.ASSISTANT, False))
    ids, trained = [], []
    for piece, train in pieces:
        piece_ids = _encode([piece], tokenizer)
        ids += piece_ids
        trained += [train] * len(piece_ids)
    return Rendered(np.asarray(ids, np.int32), np.asarray(trained, bool))


def _encode(pieces: Sequence[Special | str], tokenizer: Tokenizer) -> list[int]:
    ids: list[int] = []
    for piece in pieces:
        special = isinstance(piece, Special)
        ids += [tokenizer.special_id(piece)] if special else tokenizer.encode(piece)
    return ids


def assistant_ids(
    message: Message, tokenizer: Tokenizer, layout: Layout = Layout.THINK
) -> list[int]:
    """The ids of an assistant turn's body, end-of-sentence included: what follows a
    generation prompt in `render` (so prompt ids + these = the rendered conversation)."""
    if message.role is not Role.ASSISTANT:
        raise ValueError(f"assistant_ids: a {message.role.value} message")
    tokenizer.require(*_required(layout))
    return _encode(_assistant_parts(message, layout), tokenizer)


def parse_assistant(
    text: str, tokenizer: Tokenizer, layout: Layout = Layout.THINK
) -> Message | None:
    """The assistant message whose rendered body (without end-of-sentence) decodes to `text`:
    reasoning and answer when `text` follows `layout` exactly, else all of it as the answer;
    None for blank text. The inverse of `assistant_ids` on decoded completions."""
    if not text.strip():
        return None
    tag = lambda special: re.escape(tokenizer.content(special))
    answer = r"\n\n(?P<answer>.*)"
    if layout is Layout.READABLE:
        answer = rf"\n{tag(Special.ANSWER_BEGIN)}\n(?P<answer>.*)\n{tag(Special.ANSWER_END)}"
    pattern = rf"{tag(Special.THINK_BEGIN)}\n(?P<reasoning>.*)\n{tag(Special.THINK_END)}{answer}"
    match = re.fullmatch(pattern, text, flags=re.S)
    if match is not None and match["reasoning"].strip() and match["answer"].strip():
        return Message(Role.ASSISTANT, match["answer"], reasoning=match["reasoning"])
    return Message(Role.ASSISTANT, text)


def last_user_text(prompt: str, tokenizer: Tokenizer) -> str:
    """The last user turn of a chat-rendered prompt's text (all of it if it has none)."""
    user, assistant = tokenizer.content(Special.USER), tokenizer.content(Special.ASSISTANT)
    if user not in prompt:
        return prompt
    return prompt.rsplit(user, 1)[1].split(assistant, 1)[0]


def chat_template(tokenizer: Tokenizer, layout: Layout = Layout.THINK) -> str:
    """The Jinja `chat_template` that makes `apply_chat_template` give `render`'s ids; the
    assistant bodies are `{% generation %}` blocks (`return_assistant_tokens_mask`)."""
    tokenizer.require(*_required(layout))
    text = lambda s: json.dumps(tokenizer.content(s), ensure_ascii=False)  # a Jinja literal
    reasoning = "message['reasoning_content']"
    think = f"{text(Special.THINK_BEGIN)} + '\\n' + {reasoning} + '\\n' + {text(Special.THINK_END)}"
    if layout is Layout.THINK:
        with_reasoning = f"{think} + '\\n\\n' + message['content']"
    else:
        with_reasoning = (
            f"{think} + '\\n' + {text(Special.ANSWER_BEGIN)} + '\\n' + message['content'] "
            f"+ '\\n' + {text(Special.ANSWER_END)}"
        )
    return (
        f"{{{{ {text(Special.BOS)} }}}}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{% if not loop.first %}{{ raise_exception('a system message may only come first') }}"
        "{% endif %}{{ message['content'] }}"
        f"{{% elif message['role'] == 'user' %}}{{{{ {text(Special.USER)} + message['content'] }}}}"
        f"{{% elif message['role'] == 'assistant' %}}{{{{ {text(Special.ASSISTANT)} }}}}"
        "{% generation %}"
        f"{{% if message.get('reasoning_content') %}}{{{{ {with_reasoning} }}}}"
        "{% else %}{{ message['content'] }}{% endif %}"
        f"{{{{ {text(Special.EOS)} }}}}"
        "{% endgeneration %}"
        "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {text(Special.ASSISTANT)} }}}}{{% endif %}}"
    )


def save_for_transformers(
    tokenizer: Tokenizer, directory: str | os.PathLike, layout: Layout = Layout.THINK
) -> Path:
    """Write tokenizer.json and a tokenizer_config.json carrying the chat template, so
    `AutoTokenizer.from_pretrained(directory)` loads it; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.content(Special.BOS),
        "eos_token": tokenizer.content(Special.EOS),
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template(tokenizer, layout),
    }
    if tokenizer.pad_id is not None:
        config["pad_token"] = tokenizer.content(Special.PAD)
    tmp = directory / "tokenizer_config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, directory / "tokenizer_config.json")
    return directory
