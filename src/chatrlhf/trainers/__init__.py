"""The training steps: sft (1), reward (2), dpo (2 alternative), ppo/ (3), on one shared loop (common.py).

Each step has the same contract (docs/ARCHITECTURE.md): a <Step>Config dataclass, run_<step>(cfg) -> dict and
main(argv) -> int. Trainers use the engine (the strategy object hides DeepSpeed), models, data and algo; never apps.
"""
