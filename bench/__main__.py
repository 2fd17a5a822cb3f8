"""``python -m bench`` (what ``make bench`` runs), from the repository root: the benchmark's command line.

Bad options are reported as one line (exit 2), as chatrlhf's own commands report them; see bench/README.md.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from bench.harness import main as bench_main
    from chatrlhf.errors import UserError
    from chatrlhf.utils import setup_env

    setup_env()
    try:
        return bench_main(argv)
    except UserError as e:
        print(f"python -m bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\npython -m bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
