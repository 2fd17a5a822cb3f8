"""Training steps: sft (1), reward (2), dpo (2 alternative), ppo (3). One file per step, same contract
(docs/ARCHITECTURE.md): <Step>Config dataclass, run_<step>(cfg) -> dict, main(argv) -> int."""
