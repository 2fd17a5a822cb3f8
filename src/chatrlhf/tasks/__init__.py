"""Tasks with programmatic scorers: builtin.py (the embedded demo's task and its gold scorer) and
instructions.py (verifiable instructions for the real-model demo). Usable as --reward_fn/--eval_fn."""
