"""Step 3's flags: :class:`PPOConfig` (DeepSpeed-Chat's names and defaults) and the checks run before anything
loads (``validate``) or trains (``preflight``: the models' files, tokenizers and value heads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from chatrlhf.algo.rlhf_math import KL_ESTIMATORS, LOSS_AGGREGATIONS
from chatrlhf.config import check_output_dir
from chatrlhf.config import option as _h
from chatrlhf.data import DataConfig
from chatrlhf.engine.strategy import check_offload
from chatrlhf.errors import ModelError, UserError
from chatrlhf.models.loading import check_tokenizers_compatible, preflight_model
from chatrlhf.models.registry import resolve_model_path  # smollm2 / x.gguf -> its converted folder
from chatrlhf.trainers.config import TrainConfig
from chatrlhf.trainers.ppo.rewards import load_function

ALGOS = ("ppo", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_BASELINES = ("grpo", "rloo", "reinforce_pp_baseline")  # need several answers per prompt


@dataclass
class PPOConfig(TrainConfig, DataConfig):
    # ---- models
    actor_model_name_or_path: str = _h("Step-1 (SFT) checkpoint: the actor and its frozen reference copy.", "")
    critic_model_name_or_path: str = _h("Step-2 reward-model checkpoint: the critic (trained, PPO only) and, unless "
                                        "--reward_model_name_or_path is given, the frozen reward model.", "")
    reward_model_name_or_path: str = _h("Frozen reward model (default: --critic_model_name_or_path; 'none': no "
                                        "reward model, the score is --reward_fn's alone).", "")
    reward_model_weight: float = _h("Weight of the reward model's score in the reward.", 1.0)
    reward_fn: str = _h("Reward as code: module:function or path/to/file.py:function, called on batches of (prompts, "
                        "answers, row metadata) -> floats (see chatrlhf.trainers.ppo.rewards; the built-in task's gold "
                        "scorer is chatrlhf.tasks.builtin:reward). Added to the reward model's score, or alone with "
                        "--reward_model_name_or_path none.", "")
    reward_fn_weight: float = _h("Weight of --reward_fn's value in the reward.", 1.0)
    # ---- evaluation during RL (never trusting the reward model alone)
    eval_interval: int = _h("Every N steps (and before the first): greedy answers to --eval_samples held-out prompts "
                            "(the step-3 eval split), scored by the reward model and --eval_fn, logged as eval/* "
                            "(0: off).", 0, ge=0)
    eval_samples: int = _h("Held-out prompts per evaluation.", 64, ge=1)
    eval_fn: str = _h("Evaluation as code: module:function or file.py:function, called on (prompts, answers, "
                      "metadata) -> dict of metrics (e.g. a verifier's pass rate; chatrlhf.tasks.builtin:evaluate for "
                      "the built-in task).", "")
    save_best_by: str = _h("Keep the actor of the best evaluation as OUTPUT/best_actor, by this eval metric (e.g. "
                           "pass_rate, reward; a name from --eval_fn or the reward model's 'rm_score'); append ':min' "
                           "when lower is better. Needs --eval_interval.", "")
    algo: str = _h("ppo (actor + critic, GAE), grpo (group-normalized scores, KL in the loss), rloo "
                   "(leave-one-out baseline, KL in the reward), reinforce_pp (REINFORCE++: KL in per-token rewards, "
                   "returns normalized over the batch) or reinforce_pp_baseline (its group-mean baseline form); "
                   "all but ppo build no critic.", "ppo", choices=ALGOS)
    num_samples_per_prompt: int = _h("Answers sampled per prompt for the critic-free algorithms (group size; >= 2 "
                                     "for grpo, rloo and reinforce_pp_baseline).", 4, ge=1)
    # ---- batch sizes and schedule
    per_device_generation_batch_size: int = _h("Prompts per device per generation batch.", 16, ge=1)
    per_device_training_batch_size: int = _h("Experience rows per device per PPO micro-batch.", 16, ge=1)
    generation_batches: int = _h("Generation batches buffered before training on them.", 1, ge=1)
    ppo_epochs: int = _h("Passes over the buffered experience (the original notes > 1 diverged).", 1, ge=1)
    reuse_experience_forward: bool = _h(
        "On-policy steps (--ppo_epochs 1, one micro-batch per step, no dropout in actor/critic): run the "
        "experience pass's actor and critic forwards with autograd and train through them, instead of repeating "
        "both forwards on unchanged weights (DeepSpeed-Chat repeats them; same gradients). "
        "--no_reuse_experience_forward repeats them, and frees their activations before the reference and reward "
        "forwards (a slightly lower peak).", True)
    max_answer_seq_len: int = _h("Most new tokens generated per answer (answers stop at EOS before that).", 256,
                                 ge=1)
    actor_learning_rate: float = _h("Actor learning rate.", 9.65e-6, gt=0)
    critic_learning_rate: float = _h("Critic learning rate.", 5e-6, gt=0)
    actor_weight_decay: float = _h("Actor AdamW weight decay.", 0.0, ge=0)
    critic_weight_decay: float = _h("Critic AdamW weight decay.", 0.0, ge=0)
    # ---- DeepSpeed / memory
    actor_zero_stage: int = _h("ZeRO stage of the actor (and of the reference and EMA when 3).", 0,
                               choices=(0, 1, 2, 3))
    critic_zero_stage: int = _h("ZeRO stage of the critic (and of the reward model when 3).", 0, choices=(0, 1, 2, 3))
    offload_reference_model: bool = _h("ZeRO-3 parameter offload for the frozen reference model (needs "
                                       "--actor_zero_stage 3).", False)
    offload_reward_model: bool = _h("ZeRO-3 parameter offload for the frozen reward model (needs --critic_zero_stage "
                                    "3).", False)
    actor_lora_dim: int = _h("LoRA rank of the actor (0: off).", 0, ge=0)
    actor_lora_module_name: str = _h("Actor LoRA modules (default: --lora_module_name).", "")
    critic_lora_dim: int = _h("LoRA rank of the critic (0: off).", 0, ge=0)
    critic_lora_module_name: str = _h("Critic LoRA modules (default: --lora_module_name).", "")
    actor_gradient_checkpointing: bool = _h("Gradient checkpointing for the actor.", False)
    critic_gradient_checkpointing: bool = _h("Gradient checkpointing for the critic.", False)
    actor_dropout: Optional[float] = _h("Dropout of the actor (and reference/EMA); unset keeps the model's.", None,
                                        ge=0, lt=1)
    critic_dropout: Optional[float] = _h("Dropout of the critic (and reward model); unset keeps the model's.", None,
                                         ge=0, lt=1)
    enable_hybrid_engine: bool = _h("Generate with the hybrid engine's decoder (static KV cache, fused and, on CPU, "
                                    "MKL-packed projections; same tokens as generate()) for llama-style and OPT "
                                    "models; other models use transformers' generate. On by default; "
                                    "--no_enable_hybrid_engine turns it off.", True)
    # ---- PPO math (defaults are DeepSpeed-Chat's)
    kl_ctl: float = _h("KL penalty coefficient (initial value when --adaptive_kl).", 0.1, ge=0)
    clip_reward_value: float = _h("Reward scores are clamped to [-v, v].", 5.0, gt=0)
    cliprange: float = _h("PPO ratio clip epsilon.", 0.2, gt=0)
    cliprange_high: Optional[float] = _h("Upper ratio clip epsilon (DAPO's clip-higher, e.g. 0.28): lets unlikely "
                                         "tokens gain more per step than likely ones lose. Default: --cliprange.",
                                         None, gt=0)
    loss_agg: str = _h("How the actor's token losses become one number: token_mean (every answer token of the batch "
                       "weighs the same; DeepSpeed-Chat, DAPO), seq_mean_token_mean (each answer weighs the same; "
                       "the original GRPO) or seq_mean_token_sum_norm (token sums over the generation budget; "
                       "Dr. GRPO, no length bias).", "token_mean", choices=LOSS_AGGREGATIONS)
    drop_uniform_groups: bool = _h("Critic-free algorithms: leave out of the loss the groups whose rewards are all "
                                   "equal (no learning signal; DAPO's dynamic-sampling filter).", False)
    cliprange_value: float = _h("Value clip epsilon.", 0.2, gt=0)
    gamma: float = _h("Discount.", 1.0, ge=0, le=1)
    lam: float = _h("GAE lambda.", 0.95, ge=0, le=1)
    kl_estimator: str = _h("KL estimator in the reward: k1 (DeepSpeed-Chat), k2 or k3. GRPO's in-loss KL is k3.",
                           "k1", choices=KL_ESTIMATORS)
    adaptive_kl: bool = _h("Adapt kl_ctl towards --kl_target (Ziegler et al.).", False)
    kl_target: float = _h("Target KL (nats per answer) of the adaptive controller.", 6.0, gt=0)
    kl_horizon: int = _h("Horizon (samples) of the adaptive controller.", 10000, ge=1)
    whiten_advantages: bool = _h("Normalize advantages over each experience batch (PPO).", False)
    reward_normalization: str = _h("none | normalize | scale: running mean/std of reward scores before clipping.",
                                   "none", choices=("none", "normalize", "scale"))
    entropy_coef: float = _h("Entropy bonus coefficient in the actor loss.", 0.0, ge=0)
    ema_beta: float = _h("EMA decay for --enable_ema.", 0.992, ge=0, le=1)
    # ---- generation
    temperature: float = _h("Sampling temperature (0: greedy).", 1.0, ge=0)
    top_p: float = _h("Nucleus sampling threshold.", 1.0, gt=0, le=1)
    top_k: int = _h("Top-k sampling (0: off).", 0, ge=0)
    min_new_tokens: int = _h("Least new tokens per answer (0: EOS may end an answer at once).", 0, ge=0)
    # ---- ptx, EMA, misc (DeepSpeed-Chat's flags)
    unsupervised_dataset_name: str = _h("ptx data: a local text file (one text per line), a json/jsonl file or "
                                        "dataset dir with a 'text' column, or a hub name.", "")
    unsupervised_dataset_config_name: str = _h("Config name of a hub ptx dataset.", "")
    unsup_coef: float = _h("Weight of the ptx language-model loss.", 27.8, ge=0)
    enable_ema: bool = _h("Keep an EMA copy of the actor, saved to OUTPUT/actor_ema.", False)
    align_overflow: bool = _h("Accepted for DeepSpeed-Chat compatibility; has no effect: DeepSpeed's fp16 optimizers "
                              "skip overflowing steps themselves, and with bf16/fp32 the non-finite-loss guard already "
                              "skips the actor's and the critic's steps together.", False)
    print_answers: bool = _h("Print a prompt and its generated answer.", False)
    print_answers_interval: int = _h("Print answers every N steps.", 1, ge=1)
    enable_test_mode: bool = _h("Stop after --test_stop_step steps (for tests and smoke runs).", False)
    test_stop_step: int = _h("Steps to run in test mode (0: no limit).", 0, ge=0)
    # ---- guards
    max_ratio: float = _h("Skip a micro-step whose largest ratio exceeds this (0: off).", 20.0, ge=0)
    max_kl: float = _h("Skip an experience batch whose mean KL to the reference (nats per answer) exceeds this "
                       "(0: off).", 50.0, ge=0)
    max_consecutive_skips: int = _h("Stop (cleanly, with the reason) after this many consecutive skipped steps.", 10,
                                    ge=1)
    length_guard_steps: int = _h(
        "Stop when the answers' length collapses for this many consecutive generation batches (= steps with "
        "--generation_batches 1): every answer empty (at most --length_guard_min_tokens tokens, EOS included) or "
        "every answer cut at --max_answer_seq_len without an end-of-text token. Such a run is not marked done "
        "(exit 2; its final models and checkpoints are kept for inspection). The max-length check is off when "
        "--min_new_tokens fixes the length. 0: off.", 20, ge=0)
    length_guard_min_tokens: int = _h("Answers of at most this many tokens (EOS included) count as empty for "
                                      "--length_guard_steps.", 1, ge=0)

    def validate(self) -> None:
        """Every field's type and rule (declared with the field), then what spans fields or touches the disk."""
        DataConfig.validate(self)  # includes check_fields(self): every field of PPOConfig
        if not self.actor_model_name_or_path and self.model_name_or_path:
            self.actor_model_name_or_path = self.model_name_or_path
        if not self.actor_model_name_or_path:
            raise UserError("--actor_model_name_or_path is required (the step-1 checkpoint)")
        if not self.critic_model_name_or_path and not self.reward_model_name_or_path and not self.reward_fn:
            raise UserError("--critic_model_name_or_path is required (the step-2 reward model), or a --reward_fn")
        if self.uses_reward_model and self.reward_model_weight == 0 and not self.reward_fn:
            raise UserError("--reward_model_weight 0 with no --reward_fn leaves nothing to reward")
        if self.reward_model_name_or_path.lower() == "none" and not self.reward_fn:
            raise UserError("--reward_model_name_or_path none needs a --reward_fn (something must score answers)")
        if self.save_best_by and not self.eval_interval:
            raise UserError("--save_best_by needs --eval_interval N (the evaluations it picks from)")
        for flag in ("reward_fn", "eval_fn"):
            if getattr(self, flag):
                load_function(getattr(self, flag), f"--{flag}")  # a wrong name fails now, not after the models load
        if self.algo == "ppo" and not self.critic_model_name_or_path:
            raise UserError("--algo ppo trains a critic: --critic_model_name_or_path is required (the step-2 reward "
                            "model)")
        for f in ("actor_model_name_or_path", "critic_model_name_or_path", "reward_model_name_or_path"):
            setattr(self, f, resolve_model_path(getattr(self, f), f"--{f}"))
        if self.algo in GROUP_BASELINES and self.num_samples_per_prompt < 2:
            raise UserError(f"--algo {self.algo} needs --num_samples_per_prompt >= 2")
        if self.drop_uniform_groups and (self.algo == "ppo" or self.num_samples_per_prompt < 2):
            raise UserError("--drop_uniform_groups needs a critic-free --algo with --num_samples_per_prompt >= 2")
        check_offload(self.offload, self.actor_zero_stage, "--actor_zero_stage")
        if self.algo == "ppo":
            check_offload(self.offload, self.critic_zero_stage, "--critic_zero_stage")
        # the frozen models are DeepSpeed engines only under ZeRO-3; elsewhere these flags would do nothing
        for flag, on, stage_flag in (("--offload_reference_model", self.offload_reference_model, "actor_zero_stage"),
                                     ("--offload_reward_model", self.offload_reward_model, "critic_zero_stage")):
            if on and getattr(self, stage_flag) != 3:
                raise UserError(f"{flag} is ZeRO-3 parameter offload: it needs --{stage_flag} 3 (got "
                                f"{getattr(self, stage_flag)})")
        if self.min_new_tokens > self.max_answer_seq_len:
            raise UserError(f"--min_new_tokens {self.min_new_tokens} cannot exceed --max_answer_seq_len "
                            f"{self.max_answer_seq_len}")
        check_output_dir(self.output_dir, "--output_dir")
        if self.enable_tensorboard and self.tensorboard_path:
            check_output_dir(self.tensorboard_path, "--tensorboard_path")

    def preflight(self) -> None:
        """Model checks before anything is built or written (run by ``main``): the actor's, critic's and reward
        model's files and tokenizers, prompt + answer lengths against their positions, and a trained value head in
        the critic and the reward model (a plain causal LM would get a random one)."""
        seq = self.max_prompt_seq_len + self.max_answer_seq_len
        seq_flag = "--max_prompt_seq_len + --max_answer_seq_len ="
        actor_flag = "--actor_model_name_or_path"
        actor_tok = preflight_model(self.actor_model_name_or_path, actor_flag, seq, seq_flag,
                                    trust_remote_code=self.trust_remote_code)
        others = [("critic", "--critic_model_name_or_path", self.critic_model_name_or_path)] if self.algo == "ppo" \
            else []
        if self.uses_reward_model and self.reward_model_name_or_path:
            others.append(("reward model", "--reward_model_name_or_path", self.reward_model_name_or_path))
        elif self.uses_reward_model and self.algo != "ppo":
            others.append(("reward model", "--critic_model_name_or_path", self.critic_model_name_or_path))
        for role, flag, path in others:
            tok = preflight_model(path, flag, seq, seq_flag, value_head=True, trust_remote_code=self.trust_remote_code)
            if actor_tok is not None and tok is not None:
                try:  # PPO feeds the actor's token ids to these models: they must read them the same way
                    check_tokenizers_compatible(actor_tok, tok, ("actor", role))
                except ModelError as e:
                    raise ModelError(f"{actor_flag} {self.actor_model_name_or_path} and {flag} {path}: {e}") from None

    @property
    def uses_reward_model(self) -> bool:
        """False with --reward_model_name_or_path none, or with a --reward_fn and no reward model path at all."""
        if self.reward_model_name_or_path.lower() == "none":
            return False
        return bool(self.reward_model_name_or_path or self.critic_model_name_or_path)

    @property
    def group_size(self) -> int:
        return 1 if self.algo == "ppo" else self.num_samples_per_prompt
