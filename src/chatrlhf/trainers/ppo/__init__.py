"""Step 3: RLHF with PPO, GRPO, RLOO or REINFORCE++. trainer.py holds the loop (start reading there: run_ppo,
PPOTrainer); config.py its flags (PPOConfig); components.py the models, ptx data and EMA weights it is built from;
experience.py makes rollouts and scores them; rewards.py turns reward models and functions into scores;
evaluation.py evaluates the policy on held-out prompts during RL."""
