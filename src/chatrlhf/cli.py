"""The one command: ``chatrlhf <subcommand> [flags]``.

Each subcommand lives in its own module and exposes ``main(argv: list[str]) -> int``; modules are imported only
when their subcommand runs, so ``chatrlhf --help`` stays fast and a missing optional dependency only affects the
subcommand that needs it.
"""

from __future__ import annotations

import importlib
import sys

from chatrlhf import __version__
from chatrlhf.errors import UserError
from chatrlhf.utils import setup_env

# name -> (module:function, one-line help). Order is the order shown in --help: the pipeline, then tools.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("chatrlhf.apps.pipeline:main", "run steps 1 -> 2 -> 3 (SFT, reward model, PPO) in one command"),
    "demo": ("chatrlhf.apps.demo:main", "the embedded default: tiny models + built-in task, all three steps on CPU"),
    "sft": ("chatrlhf.trainers.sft:main", "step 1: supervised fine-tuning of the actor"),
    "reward": ("chatrlhf.trainers.reward:main", "step 2: reward model (pairwise or k-wise ranking loss)"),
    "dpo": ("chatrlhf.trainers.dpo:main", "step 2 alternative: direct preference optimization"),
    "ppo": ("chatrlhf.trainers.ppo.trainer:main", "step 3: RLHF with PPO (or --algo grpo|rloo)"),
    "eval": ("chatrlhf.apps.eval:main", "evaluate: prompts (baseline vs finetuned), reward (score answers), gold"),
    "chat": ("chatrlhf.apps.chat:main", "multi-round chat with a trained actor in the terminal"),
    "serve": ("chatrlhf.apps.serve:main", "OpenAI-compatible HTTP server for a trained actor"),
    "report": ("chatrlhf.apps.report:main", "(re)generate report.md and plots for a run directory"),
    "tiny-model": ("chatrlhf.models.tiny:main", "build a tiny random model + locally trained tokenizer"),
    "data": ("chatrlhf.apps.data_inspect:main", "data tools: `chatrlhf data inspect PATH…`"),
    "models": ("chatrlhf.models.registry:main", "GGUF files and named models (smollm2) as HF folders: `get`, `list`"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: chatrlhf <command> [options]", "",
             "Turn a pretrained causal LM into a chat assistant: SFT -> reward model -> RLHF (PPO).", "",
             "commands:"]
    lines += [f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()]
    lines += ["", "Run `chatrlhf <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"chatrlhf {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"chatrlhf: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2

    setup_env()
    target, _ = COMMANDS[name]
    mod_name, fn_name = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("chatrlhf"):
            print(f"chatrlhf: command {name!r} is not available in this build ({e.name} missing)", file=sys.stderr)
            return 2
        raise

    try:
        rc = getattr(mod, fn_name)(rest)
    except UserError as e:
        # Bad input is reported as one clear line, never a traceback from inside a library.
        print(f"chatrlhf {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nchatrlhf {name}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        # argparse's --help (0) and usage errors (2) of subcommands with their own parsers: an exit code, so
        # main(argv) always returns one (callers and tests run the CLI in-process).
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
