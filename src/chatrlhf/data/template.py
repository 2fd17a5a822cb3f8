"""How conversations become text, in one place: every step (SFT, reward, DPO, PPO/GRPO prompts), eval, chat and
serve render through a ``ChatFormat``.

Two formats:

- ``dschat``: DeepSpeed-Chat's text. A single-turn prompt is ``" Human: " + question + " Assistant:"`` and the
  answer follows with a leading space; a conversation is those rounds one after another. Data rows in this format
  are used verbatim (what DeepSpeed-Chat trains on).
- ``chat``: the tokenizer's own chat template (``apply_chat_template``). DeepSpeed-Chat-format rows are parsed into
  messages first (``parse_dschat``), so any dataset of the reference can train a model with its own template.

``--template auto`` picks ``chat`` when the tokenizer has a chat template, else ``dschat``; the resolved choice (with
a hash of the template text) is recorded in every output so chat/serve/eval render as the model was trained.

Token-in, token-out: a prompt is tokenized once, from its rendered text, without the tokenizer's automatic special
tokens in the ``chat`` format (the template writes its own BOS/turn markers); an answer is the rendered text that
follows the prompt, tokenized separately and ended at EOS. A rollout samples after exactly the prompt ids the
training forward later sees, because both are those same ids.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Sequence

HUMAN = " Human: "
ASSISTANT = " Assistant:"
HUMAN_MARKER = "Human:"  # where a reply that goes on into an invented next turn is cut

TEMPLATE_CHOICES = ("auto", "chat", "dschat")
_TURN = re.compile(r"(?:^|\s)(Human|Assistant):")


def format_prompt(question: str) -> str:
    """The single-turn DeepSpeed-Chat prompt for ``question``."""
    return HUMAN + question + ASSISTANT


def parse_dschat(text: str) -> list[dict[str, str]]:
    """DeepSpeed-Chat text -> messages. ``" Human: q1 Assistant: a1 Human: q2 Assistant:"`` gives user/assistant
    turns (an empty trailing assistant turn is the generation slot, dropped); text before the first marker becomes
    a system message; text without any marker is one user message."""
    marks = list(_TURN.finditer(text))
    if not marks:
        return [{"role": "user", "content": text.strip()}]
    msgs: list[dict[str, str]] = []
    head = text[:marks[0].start()].strip()
    if head:
        msgs.append({"role": "system", "content": head})
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        content = text[m.end():end].strip()
        role = "user" if m.group(1) == "Human" else "assistant"
        if msgs and msgs[-1]["role"] == role:  # two markers of one role in a row: one turn
            msgs[-1]["content"] = (msgs[-1]["content"] + "\n" + content).strip()
        else:
            msgs.append({"role": role, "content": content})
    if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    return msgs


def dschat_render(messages: Sequence[dict[str, str]]) -> str:
    """Messages ending with a user turn -> the DeepSpeed-Chat prompt for the next reply (system text first, on its
    own line; consecutive turns of one role joined)."""
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    parts = [f"{system}\n"] if system else []
    for m in messages:
        if m["role"] == "user":
            parts.append(HUMAN + m["content"] + ASSISTANT)
        elif m["role"] == "assistant":
            parts.append(" " + m["content"].strip())
    return "".join(parts)


def join_turns(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Messages as DeepSpeed-Chat text can show them: system messages first (joined by newlines), consecutive turns
    of one role joined by a newline, and an assistant turn with no user turn before it given an empty one."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    out: list[dict[str, str]] = [{"role": "system", "content": "\n".join(system)}] if system else []
    for m in messages:
        if m["role"] == "system":
            continue
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n" + m["content"]}
        else:
            if m["role"] == "assistant" and (not out or out[-1]["role"] != "user"):
                out.append({"role": "user", "content": ""})
            out.append({"role": m["role"], "content": m["content"]})
    return out


@dataclass(frozen=True)
class ChatFormat:
    """A resolved template: ``name`` is ``chat`` or ``dschat``; ``source`` the tokenizer's chat template text (chat)."""

    name: str
    source: str = ""

    # ---- rendering
    def prompt_from_row(self, prompt: str, tokenizer: Any = None) -> str:
        """A data row's prompt (DeepSpeed-Chat text or a plain request) -> the text generation continues from.
        ``dschat`` keeps the row verbatim (the reference's behaviour)."""
        if self.name == "dschat":
            return prompt
        return self.prompt(parse_dschat(prompt), tokenizer)

    def prompt(self, messages: Sequence[dict[str, str]], tokenizer: Any = None) -> str:
        """Messages ending with a user turn -> the prompt for the assistant's reply."""
        if self.name == "dschat":
            return dschat_render(messages)
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                             chat_template=self.source)

    def conversation_prompt(self, messages: Sequence[dict[str, str]], tokenizer: Any = None) -> str:
        """A client's conversation (chat, serve; OpenAI-style messages ending with a user turn) -> the prompt for
        the assistant's reply. A chat template gets the messages as given; ``dschat`` text cannot show two turns of
        one speaker in a row, so those are joined first (``join_turns``)."""
        return self.prompt(join_turns(messages) if self.name == "dschat" else messages, tokenizer)

    def answer_from_row(self, prompt: str, answer: str, tokenizer: Any = None) -> str:
        """The text that follows ``prompt_from_row(prompt)`` when the assistant replies ``answer``. For ``chat``: the
        template's own rendering of the reply (closing turn marker included) when the template renders the reply as
        a continuation of the generation prompt, else the stripped reply."""
        if self.name == "dschat":
            return answer
        msgs = parse_dschat(prompt)
        head = self.prompt(msgs, tokenizer)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": answer.strip()}],
                                             tokenize=False, chat_template=self.source)
        return full[len(head):] if full.startswith(head) else answer.strip()

    # ---- tokenization
    @property
    def add_special_tokens(self) -> bool:
        """Whether tokenizing rendered text adds the tokenizer's BOS/EOS: a chat template writes its own."""
        return self.name == "dschat"

    @property
    def stop_markers(self) -> tuple[str, ...]:
        """Text that ends a reply besides EOS: an invented next ``Human:`` turn in the DeepSpeed-Chat format."""
        return (HUMAN_MARKER,) if self.name == "dschat" else ()

    def record(self) -> dict[str, str]:
        """What outputs record: the name, and a hash of the template text (chat)."""
        out = {"name": self.name}
        if self.source:
            out["sha256"] = hashlib.sha256(self.source.encode("utf-8")).hexdigest()[:16]
        return out


DSCHAT = ChatFormat("dschat")


def has_chat_template(tokenizer: Any) -> bool:
    return isinstance(getattr(tokenizer, "chat_template", None), str) and bool(tokenizer.chat_template)


def resolve_format(choice: str, tokenizer: Any, flag: str = "--template") -> ChatFormat:
    """``auto`` | ``chat`` | ``dschat`` (or a record written by ``ChatFormat.record``'s name) -> a ChatFormat.
    ``chat`` for a tokenizer without a template is refused (ValueError: the caller names the model)."""
    choice = (choice or "auto").strip().lower()
    if choice not in TEMPLATE_CHOICES:
        raise ValueError(f"{flag} {choice!r}: choose one of {', '.join(TEMPLATE_CHOICES)}")
    if choice == "dschat" or (choice == "auto" and not has_chat_template(tokenizer)):
        return DSCHAT
    if not has_chat_template(tokenizer):
        raise ValueError(f"{flag} chat: the tokenizer has no chat template (use --template dschat or auto)")
    return ChatFormat("chat", tokenizer.chat_template)
