"""``chatrlhf chat --path DIR``: multi-round chat with a trained actor in the terminal.

DeepSpeed-Chat's behaviour: the conversation rendered as the model was trained (``Human: {x} Assistant:`` text, or
the tokenizer's chat template: the checkpoint's recorded format, or ``--template``), the whole conversation kept as
context, ``quit`` exits, ``clear`` forgets the conversation, each reply cut at the next ``Human:`` (DeepSpeed-Chat
text) or EOS. Better than the original:
tokens are printed as they are generated, the tokenizer always comes from the checkpoint dir itself (offline), the
oldest rounds are dropped (and said so) when the conversation outgrows the model's context, and piped stdin works
(``echo hi | chatrlhf chat --path DIR``): end of input exits cleanly.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from chatrlhf.config import Check, parse_config
from chatrlhf.data.template import TEMPLATE_CHOICES, resolve_format
from chatrlhf.engine.generation import (SamplingParams, build_prompt, context_length, format_for_checkpoint,
                                        load_for_inference, prompt_token_ids, stream_generate)
from chatrlhf.errors import UserError
from chatrlhf.models.registry import resolve_model_path

INPUT_PROMPT = "Enter input (type 'quit' to exit, 'clear' to clean memory): "


@dataclass
class ChatConfig:
    path: str = field(default=None, metadata={"help": "Checkpoint dir of the trained actor (e.g. OUTPUT/step3_ppo/actor)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens generated per reply."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (ignored with --greedy)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling mass (ignored with --greedy)."})
    greedy: bool = field(default=False, metadata={"help": "Greedy decoding: deterministic replies."})
    seed: int = field(default=None, metadata={"help": "Seed for sampling, for reproducible conversations."})
    dtype: str = field(default="auto", metadata={"help": "auto (fp32 on CPU, bf16 on accelerators), fp32, bf16, fp16."})
    system: str = field(default=None, metadata={"help": "Optional system text placed before the conversation."})
    template: str = field(default="auto", metadata={
        "help": "How the conversation becomes text: auto (the format the checkpoint records it was trained with; "
                "with no record, the tokenizer's chat template when it has one, else DeepSpeed-Chat's "
                "' Human: ... Assistant:'), chat (the tokenizer's chat template) or dschat.",
        "check": Check(choices=TEMPLATE_CHOICES)})
    show_prompt: bool = field(default=False, metadata={
        "help": "Debug: print the exact prompt the model sees (JSON-quoted, one line) before each reply."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run the Python code in the model folder (a custom model family: config.json auto_map naming "
                "classes in its modeling_*.py). It runs with your permissions: only for folders you trust."})

    def validate(self) -> None:
        if not self.path:
            raise UserError("--path is required (a trained actor checkpoint dir)")

        self.path = resolve_model_path(self.path, "--path")
        if self.max_new_tokens < 1:
            raise UserError("--max_new_tokens must be >= 1")
        if not self.greedy and self.temperature <= 0:
            raise UserError("--temperature must be > 0 (or use --greedy)")


class Conversation:
    """The history of (user, reply) rounds and how it is turned into the next prompt within the context."""

    def __init__(self, tokenizer, context: int, max_new_tokens: int, system: str | None = None, fmt=None):
        self.tokenizer, self.context, self.max_new_tokens, self.system = tokenizer, context, max_new_tokens, system
        self.fmt = fmt if fmt is not None else resolve_format("auto", tokenizer)  # a ChatFormat
        self.history: list[tuple[str, str]] = []

    def clear(self) -> None:
        self.history = []

    def prompt_for(self, user_msg: str) -> tuple[str, int, int]:
        """(prompt, rounds dropped, tokens left for the reply). The oldest rounds are dropped while the prompt
        leaves less than ``max_new_tokens`` (at most half the context, so small models still get a say) for the
        reply."""
        reserve = min(self.max_new_tokens, self.context // 2)
        dropped = 0
        while True:
            prompt = build_prompt(self.history[dropped:], user_msg, self.tokenizer, self.system, fmt=self.fmt)
            n = len(prompt_token_ids(self.tokenizer, prompt, self.fmt))
            if n + reserve <= self.context or dropped == len(self.history):
                break
            dropped += 1
        if n + reserve > self.context:
            raise UserError(f"the message is too long: {n} prompt tokens leave fewer than {reserve} of the model's "
                            f"{self.context}-token context for the reply")
        self.history = self.history[dropped:]
        return prompt, dropped, min(self.max_new_tokens, self.context - n)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ChatConfig, argv, prog="chatrlhf chat", description=__doc__.split("\n")[0])

    model, tok = load_for_inference(cfg.path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    fmt = format_for_checkpoint(cfg.path, tok, cfg.template)  # prints "template: NAME (why)"
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, method="greedy" if cfg.greedy else "sample",
                            temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    conv = Conversation(tok, context_length(model, tok), cfg.max_new_tokens, cfg.system, fmt)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    rounds = 0
    while True:
        try:
            user = input(INPUT_PROMPT if interactive else "")
        except EOFError:  # piped input ran out, or Ctrl-D
            if interactive:
                print()
            return 0
        cmd = user.strip()
        if cmd == "quit":
            return 0
        if cmd == "clear":
            conv.clear()
            rounds = 0
            print("[conversation cleared]", flush=True)
            continue
        if not cmd:
            continue
        try:
            prompt, dropped, room = conv.prompt_for(user)
        except UserError as e:
            print(f"[{e}]", flush=True)
            continue
        if dropped:
            print(f"[context full: dropped the {dropped} oldest round(s)]", flush=True)
        if cfg.show_prompt:
            print(f"[prompt] {json.dumps(prompt, ensure_ascii=False)}", flush=True)
        rounds += 1
        out.write("Assistant: ")
        out.flush()
        pieces = []
        for piece in stream_generate(model, tok, prompt, params, fmt=fmt, max_new_tokens=room):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        conv.history.append((user, "".join(pieces)))
