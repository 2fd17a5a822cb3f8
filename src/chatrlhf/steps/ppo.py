"""Step 3: RLHF with PPO (DeepSpeed-Chat's math by default), or critic-free GRPO / RLOO with ``--algo``.

Models: actor (step-1 checkpoint, trained), reference (a frozen copy of it), critic (the step-2 reward model,
trained; PPO only), reward model (step 2, frozen), optional EMA of the actor. The loop, top to bottom:

    for each batch of prompts:
        experience = generate -> drop answers with <= 1 real token -> score (reward model and/or --reward_fn),
                     log-probs, values
        buffer it; when generation_batches are buffered:
            rewards + GAE (PPO) or group baselines (GRPO/RLOO)
            ppo_epochs passes over shuffled micro-batches: actor (+ critic) step, ptx step, EMA update
            log, print answers, evaluate every eval_interval (best actor kept), checkpoint every save_interval,
            stop on repeated guard skips / test_stop_step
            stop as failed (exit 2, no done.json) on non-finite weights/outputs or a collapsed answer length
    save actor, critic, actor_ema (Hugging Face dirs), done.json

Math lives in :mod:`chatrlhf.rlhf_math`, experience and micro-steps in :mod:`chatrlhf.steps.ppo_experience`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from chatrlhf import rlhf_math as rm
from chatrlhf.data import DataConfig, PromptCollator, build_phase_datasets
from chatrlhf.data.phases import chat_format
from chatrlhf.errors import UserError
from chatrlhf.steps import common
from chatrlhf.steps import ppo_experience as px
from chatrlhf.steps.common import TrainConfig
from chatrlhf.steps.ppo_eval import PolicyEval, metric_value
from chatrlhf.steps.rewards import Scorer, load_function
from chatrlhf.utils import print_rank0

ALGOS = ("ppo", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_BASELINES = ("grpo", "rloo", "reinforce_pp_baseline")  # need several answers per prompt


def _h(text: str, default: Any = None, **check: Any):
    """A field with its help text and, as keywords, its rule (see chatrlhf.config.Check)."""
    from chatrlhf.config import option

    return option(text, default, **check)


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
                        "answers, row metadata) -> floats (see chatrlhf.steps.rewards; the built-in task's gold "
                        "scorer is chatrlhf.task:reward). Added to the reward model's score, or alone with "
                        "--reward_model_name_or_path none.", "")
    reward_fn_weight: float = _h("Weight of --reward_fn's value in the reward.", 1.0)
    # ---- evaluation during RL (never trusting the reward model alone)
    eval_interval: int = _h("Every N steps (and before the first): greedy answers to --eval_samples held-out prompts "
                            "(the step-3 eval split), scored by the reward model and --eval_fn, logged as eval/* "
                            "(0: off).", 0, ge=0)
    eval_samples: int = _h("Held-out prompts per evaluation.", 64, ge=1)
    eval_fn: str = _h("Evaluation as code: module:function or file.py:function, called on (prompts, answers, "
                      "metadata) -> dict of metrics (e.g. a verifier's pass rate; chatrlhf.task:evaluate for the "
                      "built-in task).", "")
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
                       "Dr. GRPO, no length bias).", "token_mean", choices=rm.LOSS_AGGREGATIONS)
    drop_uniform_groups: bool = _h("Critic-free algorithms: leave out of the loss the groups whose rewards are all "
                                   "equal (no learning signal; DAPO's dynamic-sampling filter).", False)
    cliprange_value: float = _h("Value clip epsilon.", 0.2, gt=0)
    gamma: float = _h("Discount.", 1.0, ge=0, le=1)
    lam: float = _h("GAE lambda.", 0.95, ge=0, le=1)
    kl_estimator: str = _h("KL estimator in the reward: k1 (DeepSpeed-Chat), k2 or k3. GRPO's in-loss KL is k3.",
                           "k1", choices=rm.KL_ESTIMATORS)
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
    align_overflow: bool = _h("fp16: when the actor or the critic overflows, skip both steps.", False)
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
        from chatrlhf.config import check_output_dir

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
                from chatrlhf.steps.rewards import load_function

                load_function(getattr(self, flag), f"--{flag}")  # a wrong name fails now, not after the models load
        if self.algo == "ppo" and not self.critic_model_name_or_path:
            raise UserError("--algo ppo trains a critic: --critic_model_name_or_path is required (the step-2 reward "
                            "model)")
        from chatrlhf.models.registry import resolve_model_path  # smollm2 / x.gguf -> its converted folder

        for f in ("actor_model_name_or_path", "critic_model_name_or_path", "reward_model_name_or_path"):
            setattr(self, f, resolve_model_path(getattr(self, f), f"--{f}"))
        if self.algo in GROUP_BASELINES and self.num_samples_per_prompt < 2:
            raise UserError(f"--algo {self.algo} needs --num_samples_per_prompt >= 2")
        if self.drop_uniform_groups and (self.algo == "ppo" or self.num_samples_per_prompt < 2):
            raise UserError("--drop_uniform_groups needs a critic-free --algo with --num_samples_per_prompt >= 2")
        from chatrlhf.engine.strategy import check_offload

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
        from chatrlhf.errors import ModelError
        from chatrlhf.models.loading import check_tokenizers_compatible, preflight_model

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


# ------------------------------------------------------------------------------------------------ set-up helpers
def _view(cfg: PPOConfig, who: str) -> TrainConfig:
    """The TrainConfig fields the shared helpers read, for the actor or the critic."""
    import dataclasses

    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    d.update(model_name_or_path=getattr(cfg, f"{who}_model_name_or_path"), zero_stage=getattr(cfg, f"{who}_zero_stage"),
             lora_dim=getattr(cfg, f"{who}_lora_dim"), learning_rate=getattr(cfg, f"{who}_learning_rate"),
             weight_decay=getattr(cfg, f"{who}_weight_decay"), dropout=getattr(cfg, f"{who}_dropout"),
             gradient_checkpointing=getattr(cfg, f"{who}_gradient_checkpointing"),
             lora_module_name=getattr(cfg, f"{who}_lora_module_name") or cfg.lora_module_name,
             per_device_train_batch_size=cfg.per_device_training_batch_size)
    return TrainConfig(**d)


def load_actor_like(cfg: PPOConfig, strategy, tokenizer, zero_stage: int, train: bool, lora: bool):
    """Actor, reference or EMA: the step-1 model, partitioned at load under ZeRO-3."""
    from chatrlhf.models.loading import load_causal_lm

    view = _view(cfg, "actor")
    with strategy.zero3_init_context(stage=zero_stage, train=train):
        model = load_causal_lm(cfg.actor_model_name_or_path, dtype=strategy.torch_dtype, dropout=cfg.actor_dropout,
                               tokenizer=tokenizer, trust_remote_code=cfg.trust_remote_code)
    if lora:
        model = common.maybe_lora(model, view)
    if train and cfg.actor_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_reward_like(cfg: PPOConfig, strategy, path: str, zero_stage: int, train: bool):
    from chatrlhf.models.reward_model import load_reward_model

    with strategy.zero3_init_context(stage=zero_stage, train=train):
        model = load_reward_model(path, dtype=strategy.torch_dtype, dropout=cfg.critic_dropout,
                                  trust_remote_code=cfg.trust_remote_code)
    if train:
        model = common.maybe_lora(model, _view(cfg, "critic"))
        if cfg.critic_gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def rounds_per_epoch(n_prompt_batches: int, cfg: PPOConfig) -> int:
    return max(1, n_prompt_batches // cfg.generation_batches)


def micro_batches_per_round(cfg: PPOConfig) -> int:
    rows = cfg.per_device_generation_batch_size * cfg.group_size
    return cfg.generation_batches * math.ceil(rows / cfg.per_device_training_batch_size)


# ------------------------------------------------------------------------------------------------ ptx data
def load_unsupervised_texts(name: str, config_name: str = "") -> list[str]:
    p = Path(name)
    if p.is_file() and p.suffix in (".txt", ""):
        return [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if p.is_file() and p.suffix in (".json", ".jsonl"):
        if p.suffix == ".jsonl":
            rows = [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        else:
            rows = json.loads(p.read_text(encoding="utf-8"))
        return [r["text"] if isinstance(r, dict) else str(r) for r in rows]
    import datasets

    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
    else:
        ds = datasets.load_dataset(name, config_name or None)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[list(ds)[0]]
    if "text" not in ds.column_names:
        raise UserError(f"--unsupervised_dataset_name {name}: no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t and t.strip()]


def unsupervised_blocks(texts: list[str], tokenizer, block_size: int) -> list[torch.Tensor]:
    """DeepSpeed-Chat's group_texts: concatenate all texts (EOS between them) and cut blocks of block_size."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // block_size
    if n == 0:
        raise UserError(f"ptx data has {len(ids)} tokens, fewer than one block of {block_size}")
    return [torch.tensor(ids[i * block_size:(i + 1) * block_size]) for i in range(n)]


def _collate_blocks(items):
    x = torch.stack(items)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


# ------------------------------------------------------------------------------------------------ state
def _named_params_rank0(module, strategy) -> dict[str, torch.Tensor] | None:
    """Raw (un-merged) parameters on rank 0, gathered one at a time under ZeRO-3."""
    import deepspeed

    out = {}
    for n, p in px.unwrap(module).named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            if strategy.is_rank0:
                out[n] = p.detach().cpu().clone().contiguous()
    return out if strategy.is_rank0 else None


def _load_named_params(module, strategy, path: Path) -> None:
    import deepspeed
    from safetensors.torch import load_file

    sd = load_file(str(path)) if strategy.is_rank0 else {}
    for n, p in px.unwrap(module).named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
            if strategy.is_rank0 or not hasattr(p, "ds_id"):
                if not strategy.is_rank0:
                    continue
                p.data.copy_(sd[n].to(p.dtype))
    if strategy.world_size > 1 and not strategy.is_zero3(module):
        import torch.distributed as dist

        for p in px.unwrap(module).parameters():
            dist.broadcast(p.data, src=0)


def _all_reduce_max(strategy, x: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


# ------------------------------------------------------------------------------------------------ the step
def run_ppo(cfg: PPOConfig) -> dict:
    cfg.validate()
    out_dir = Path(cfg.output_dir)
    strategy = common.build_strategy(cfg, zero_stage=cfg.actor_zero_stage, micro_batch=cfg.per_device_training_batch_size)
    device = strategy.device
    rank0 = strategy.is_rank0
    ppo = cfg.algo == "ppo"

    # ---- tokenizers: actor and reward model must agree before anything trains
    from chatrlhf.models.loading import check_tokenizers_compatible, load_tokenizer

    use_rm = cfg.uses_reward_model and cfg.reward_model_weight != 0
    reward_path = (cfg.reward_model_name_or_path or cfg.critic_model_name_or_path) if use_rm else ""
    trust = cfg.trust_remote_code
    tokenizer = load_tokenizer(cfg.actor_model_name_or_path, padding_side="left", trust_remote_code=trust)
    if use_rm:
        check_tokenizers_compatible(tokenizer, load_tokenizer(reward_path, trust_remote_code=trust),
                                    ("actor", "reward model"))
    if ppo and cfg.critic_model_name_or_path and cfg.critic_model_name_or_path != reward_path:
        check_tokenizers_compatible(tokenizer, load_tokenizer(cfg.critic_model_name_or_path, trust_remote_code=trust),
                                    ("actor", "critic"))

    # ---- data
    train_ds, eval_ds = build_phase_datasets(3, cfg, tokenizer)
    if len(train_ds) == 0:
        raise UserError("no step-3 prompts (check --data_path / --data_split / --max_prompt_seq_len)")
    prompt_loader = common.make_dataloader(train_ds, PromptCollator(tokenizer.pad_token_id),
                                           cfg.per_device_generation_batch_size, strategy, shuffle=True, seed=cfg.seed)
    per_epoch = rounds_per_epoch(len(prompt_loader), cfg)
    total_rounds = cfg.max_steps if cfg.max_steps > 0 else per_epoch * cfg.num_train_epochs
    if cfg.enable_test_mode and cfg.test_stop_step > 0:
        total_rounds = min(total_rounds, cfg.test_stop_step)
    opt_steps = max(1, total_rounds * cfg.ppo_epochs * micro_batches_per_round(cfg) // cfg.gradient_accumulation_steps)

    # ---- models
    actor_z3, critic_z3 = cfg.actor_zero_stage == 3, cfg.critic_zero_stage == 3
    actor = load_actor_like(cfg, strategy, tokenizer, cfg.actor_zero_stage, train=True, lora=cfg.actor_lora_dim > 0)
    a_opt, a_sched = common.create_optimizer_and_scheduler(strategy, actor, _view(cfg, "actor"), opt_steps)
    actor = strategy.prepare(actor, a_opt, a_sched, zero_stage=cfg.actor_zero_stage)
    ref = load_actor_like(cfg, strategy, tokenizer, 3 if actor_z3 else 0, train=False, lora=False)
    ref = strategy.prepare_eval(ref, zero_stage=3 if actor_z3 else 0, offload=cfg.offload_reference_model)
    ema = None
    if cfg.enable_ema:
        ema = load_actor_like(cfg, strategy, tokenizer, 3 if actor_z3 else 0, train=False, lora=cfg.actor_lora_dim > 0)
        ema = strategy.prepare_eval(ema, zero_stage=3 if actor_z3 else 0)
        px.ema_update(actor, ema, strategy, beta=0.0)  # start from the actor's exact weights (LoRA init included)
    critic = None
    if ppo:
        critic = load_reward_like(cfg, strategy, cfg.critic_model_name_or_path, cfg.critic_zero_stage, train=True)
        c_opt, c_sched = common.create_optimizer_and_scheduler(strategy, critic, _view(cfg, "critic"), opt_steps)
        critic = strategy.prepare(critic, c_opt, c_sched, zero_stage=cfg.critic_zero_stage)
    reward_model = None
    if use_rm:
        reward_model = load_reward_like(cfg, strategy, reward_path, 3 if critic_z3 else 0, train=False)
        reward_model = strategy.prepare_eval(reward_model, zero_stage=3 if critic_z3 else 0,
                                             offload=cfg.offload_reward_model)
    scorer = Scorer(tokenizer, reward_model, load_function(cfg.reward_fn, "--reward_fn") if cfg.reward_fn else None,
                    cfg.reward_fn, cfg.reward_model_weight, cfg.reward_fn_weight)
    evaluator = None
    if cfg.eval_interval:
        if not len(eval_ds):
            print_rank0("warning: --eval_interval: the step-3 data has no eval split, so the evaluation uses "
                        "training prompts (not held out)")
        evaluator = PolicyEval(eval_ds if len(eval_ds) else train_ds, cfg, strategy, tokenizer,
                               Scorer(tokenizer, reward_model), cfg.eval_fn)

    # ---- ptx data
    unsup_iter = None
    if cfg.unsupervised_dataset_name:
        blocks = unsupervised_blocks(load_unsupervised_texts(cfg.unsupervised_dataset_name,
                                                             cfg.unsupervised_dataset_config_name),
                                     tokenizer, cfg.max_prompt_seq_len + cfg.max_answer_seq_len)
        unsup_loader = common.make_dataloader(blocks, _collate_blocks, cfg.per_device_training_batch_size, strategy,
                                              shuffle=True, seed=cfg.seed + 1)

        def _cycle():
            ep = 0
            while True:
                unsup_loader.sampler.set_epoch(ep)
                yield from unsup_loader
                ep += 1

        unsup_iter = _cycle()

    # ---- math objects
    kl_ctl = (rm.AdaptiveKLController(cfg.kl_ctl, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else rm.FixedKLController(cfg.kl_ctl))
    reward_stats = rm.RunningMoments()
    policy_loss = rm.PolicyLoss(cfg.cliprange, cfg.entropy_coef, cfg.cliprange_high, cfg.loss_agg)
    value_loss = rm.ValueLoss(cfg.cliprange_value)
    gen_params = px.GenerationParams(max_new_tokens=cfg.max_answer_seq_len, min_new_tokens=cfg.min_new_tokens,
                                     do_sample=cfg.temperature > 0, temperature=cfg.temperature or 1.0,
                                     top_p=cfg.top_p, top_k=cfg.top_k, num_return_sequences=cfg.group_size,
                                     hybrid=cfg.enable_hybrid_engine)

    def reward_fn(score: torch.Tensor) -> torch.Tensor:
        if cfg.reward_normalization == "none":
            return score
        reward_stats.update(score)
        return reward_stats.normalize(score) if cfg.reward_normalization == "normalize" else reward_stats.scale(score)

    # ---- resume
    # trained_rounds: rounds in which at least one micro-step updated the weights (the guards may skip all)
    state = {"round": 0, "epoch": 0, "batch_in_epoch": 0, "ema_reward": None, "consecutive_skips": 0,
             "trained_rounds": 0, "length_streak": 0, "length_kind": "", "best": None, "best_round": None}
    ckpt_root = out_dir / "checkpoints"
    resume_dir = common.resolve_resume(cfg)
    engines = {"actor": actor, **({"critic": critic} if critic is not None else {})}
    if resume_dir is not None:
        saved = strategy.load_state(engines, resume_dir)
        state.update({k: saved[k] for k in state if k in saved})
        state["trained_rounds"] = saved.get("trained_rounds", state["round"])  # older checkpoints: every round
        kl_ctl.load_state_dict(saved["kl_ctl"])
        reward_stats.load_state_dict(saved["reward_stats"])
        if ema is not None and (resume_dir / "actor_ema.safetensors").exists():
            _load_named_params(ema, strategy, resume_dir / "actor_ema.safetensors")
        print_rank0(f"resumed from {resume_dir} at step {state['round']} (epoch {state['epoch']}, "
                    f"prompt batch {state['batch_in_epoch']})")

    from chatrlhf.metrics import MetricsWriter

    tb_dir = (cfg.tensorboard_path or str(out_dir / "tensorboard")) if cfg.enable_tensorboard else None
    writer = MetricsWriter(out_dir, tb_dir)
    a_dims, c_dims = px.model_dims(actor), (px.model_dims(critic) if critic is not None else None)
    r_dims = px.model_dims(reward_model) if reward_model is not None else None
    bar = common.progress_bar(total_rounds, state["round"], f"step3 {cfg.algo}", rank0)
    print_rank0(f"***** step 3 ({cfg.algo}): {len(train_ds)} prompts, {per_epoch} steps/epoch, {total_rounds} steps, "
                f"{strategy.world_size} rank(s), dtype {strategy.cfg.dtype}, actor ZeRO-{cfg.actor_zero_stage}, "
                + (f"critic ZeRO-{cfg.critic_zero_stage}" if ppo else f"reward model ZeRO-{3 if critic_z3 else 0}")
                + " *****")

    # on-policy: the experience pass's actor/critic forward is the training forward (see make_experience)
    reuse_fwd = (cfg.reuse_experience_forward and cfg.ppo_epochs == 1 and micro_batches_per_round(cfg) == 1
                 and all(px.train_forward_is_deterministic(m) for m in (actor, critic) if m is not None))
    if cfg.reuse_experience_forward and not reuse_fwd:
        print_rank0("experience forwards are repeated for training: --reuse_experience_forward needs --ppo_epochs 1, "
                    "one micro-batch per step (generation rows <= --per_device_training_batch_size, "
                    f"--generation_batches 1) and no dropout in the {'actor and critic' if ppo else 'actor'}")

    last: dict[str, Any] = {}
    evals: dict[str, float] = {}
    if evaluator is not None and resume_dir is None:  # the starting point of the eval curve
        evals = _evaluate(evaluator, actor, state, cfg, strategy, writer, tokenizer, out_dir)
    stop_reason = ""
    failed = False  # a stop that leaves no finished run: weights blew up, or the answers' length collapsed
    buffer: list[px.Experience] = []
    round_t0 = time.time()
    timing = {"generation_s": 0.0, "inference_s": 0.0, "training_s": 0.0, "gen_tokens": 0, "rows": 0, "seq_tokens": 0,
              "dropped": 0}
    generated = []  # (prompt text, answer text) of the round, for --print_answers

    max_epochs = cfg.num_train_epochs if cfg.max_steps <= 0 else 10**9
    while state["round"] < total_rounds and not stop_reason and state["epoch"] < max_epochs:
        epoch = state["epoch"]
        rounds_at_epoch_start = state["round"]
        prompt_loader.sampler.set_epoch(epoch)
        prompt_loader.sampler.set_start(state["batch_in_epoch"] * cfg.per_device_generation_batch_size)
        for batch in prompt_loader:
            state["batch_in_epoch"] += 1
            batch = common.to_device(batch, device)
            exp, t = px.make_experience(actor, ref, critic, scorer, strategy, tokenizer,
                                        batch["prompt_input_ids"], batch["prompt_attention_mask"], gen_params,
                                        cfg.group_size, train_forward=reuse_fwd,
                                        entropy_grad=policy_loss.entropy_coef != 0, prompts=batch.get("prompt"),
                                        metas=batch.get("meta"))
            timing["generation_s"] += t["generation_s"]
            timing["inference_s"] += t["inference_s"]
            timing["gen_tokens"] += t["generated_tokens"]
            timing["rows"] += t["generated_rows"]
            timing["seq_tokens"] += t["seq_len"] * t["generated_rows"]
            timing["dropped"] += t["dropped"]  # answers with <= 1 real token (reported with the step line)
            # counted per generation batch, before the short-answer drop: a batch of only empty answers is skipped
            # below without a step, and would otherwise go unnoticed until a whole pass produced nothing
            stop_reason = _length_guard(state, cfg, t, strategy)
            if stop_reason:
                failed = True
                break
            n_valid = strategy.all_reduce_sum(0 if exp.info["placeholder"] else len(exp)).item()
            if n_valid == 0:
                print_rank0(f"step {state['round'] + 1}: every answer of this generation batch had <= 1 real "
                            "token; batch skipped")
                continue
            if rank0 and cfg.print_answers and (state["round"] + 1) % cfg.print_answers_interval == 0:
                p = exp.prompt_len
                generated.append((tokenizer.decode(exp.seq[0, :p], skip_special_tokens=True),
                                  tokenizer.decode(exp.seq[0, p:][exp.attention_mask[0, p:].bool()],
                                                   skip_special_tokens=True)))
            buffer.append(exp)
            if len(buffer) < cfg.generation_batches:
                continue

            # ---- rewards and advantages
            stats = _experience_stats(buffer, strategy)
            if cfg.max_kl and stats["kl"] > cfg.max_kl:
                reason = f"KL to reference {stats['kl']:.3g} > --max_kl {cfg.max_kl:g}"
                buffer.clear()
                stop_reason = _skip(state, cfg, reason)
                state["round"] += 1
                bar.update(1)
                if stop_reason or state["round"] >= total_rounds:
                    break
                continue
            uniform = 0  # samples of equal-reward groups left out of the loss (--drop_uniform_groups)
            for e in buffer:
                if ppo:
                    px.finalize_ppo(e, kl_ctl.value, cfg.clip_reward_value, cfg.gamma, cfg.lam, cfg.kl_estimator,
                                    reward_fn if cfg.reward_normalization != "none" else None,
                                    cfg.whiten_advantages)
                else:
                    px.finalize_group(e, cfg.algo, cfg.group_size, kl_ctl.value, cfg.clip_reward_value,
                                      cfg.kl_estimator, reward_fn if cfg.reward_normalization != "none" else None,
                                      cfg.drop_uniform_groups)
                    uniform += e.info.get("uniform_dropped", 0)

            # ---- ppo_epochs passes over shuffled micro-batches
            t_train = time.time()
            micro = _micro_batches(buffer, cfg, state["round"])
            results, unsup_losses = [], []
            actor.train()
            if critic is not None:
                critic.train()
            for ep in range(cfg.ppo_epochs):
                g = torch.Generator().manual_seed(cfg.seed * 1000 + state["round"] * 10 + ep)
                for i in torch.randperm(len(micro), generator=g).tolist():
                    r = px.train_micro_batch(micro[i], actor, critic, strategy, policy_loss, value_loss, cfg.algo,
                                             kl_coef_in_loss=kl_ctl.value if cfg.algo == "grpo" else 0.0,
                                             max_ratio=cfg.max_ratio)
                    if r.skipped:
                        print_rank0(f"step {state['round'] + 1}: micro-step skipped ({r.skipped})")
                    elif unsup_iter is not None:
                        ub = common.to_device(next(unsup_iter), device)
                        unsup_losses.append(px.train_unsupervised(ub, actor, strategy, cfg.unsup_coef))
                    if ema is not None and not r.skipped:
                        px.ema_update(actor, ema, strategy, cfg.ema_beta)
                    results.append(r)
            _align_overflow_note(cfg)
            timing["training_s"] += time.time() - t_train
            buffer.clear()
            kl_ctl.update(stats["kl"], stats["n"])
            state["round"] += 1
            bar.update(1)

            # ---- metrics
            done = [r for r in results if not r.skipped]
            if not done:
                stop_reason = _skip(state, cfg, results[0].skipped if results else "no micro-batches")
            else:
                state["consecutive_skips"] = 0
                state["trained_rounds"] += 1
            agg = _aggregate(done, strategy, critic=ppo)
            state["ema_reward"] = (stats["reward_mean"] if state["ema_reward"] is None
                                   else 0.9 * state["ema_reward"] + 0.1 * stats["reward_mean"])
            last = {**stats, **agg, "ema_reward": state["ema_reward"], "kl_coef": kl_ctl.value,
                    "skipped": len(results) - len(done),
                    **({"uniform_dropped": uniform} if cfg.drop_uniform_groups else {}),
                    "actor_lr": strategy.get_lr(actor)[0],
                    **({"unsup_loss": sum(unsup_losses) / len(unsup_losses)} if unsup_losses else {})}
            last.pop("n", None)
            writer.log("train", state["round"], **last)
            tput = _throughput(timing, time.time() - round_t0, cfg, strategy, a_dims, c_dims, r_dims, stats,
                               reuse_fwd)
            tput["dropped_answers"] = timing["dropped"]
            writer.log("throughput", state["round"], **tput)
            if rank0 and (state["round"] % max(1, cfg.log_interval) == 0 or state["round"] == 1
                          or state["round"] == total_rounds):
                print_rank0(f"step {state['round']}/{total_rounds} | reward {last['reward_mean']:.4f} "
                            f"(ema {last['ema_reward']:.4f}) | kl {last['kl']:.4f} | actor_loss "
                            f"{last.get('actor_loss', float('nan')):.4f} | "
                            + (f"critic_loss {last.get('critic_loss', float('nan')):.4f} | " if ppo else "")
                            + f"clipfrac {last.get('clipfrac', 0):.3f} | "
                            f"ratio_max {last.get('ratio_max', 0):.3f} | len {last['response_length']:.1f}"
                            + (f" | dropped {timing['dropped']} short" if timing["dropped"] else ""))
                print_rank0(tput.pop("_lines"))
            else:
                tput.pop("_lines", None)
            for q, a in generated:
                print_rank0(f"--- prompt: {q!r}\n--- answer: {a!r}")
            generated.clear()
            timing = {k: 0 for k in timing}
            round_t0 = time.time()

            # ---- non-finite guard: the weights just written must still give finite outputs, else the next
            # generation samples from NaN probabilities (and no checkpoint of this step may be saved)
            bad = px.nonfinite_after_update(actor, critic, micro[-1], strategy) if done else ""
            if bad:
                stop_reason, failed = f"non-finite {bad} after the update of step {state['round']}", True
                break

            # ---- evaluation by code, not only by the reward model (and the best actor kept)
            if evaluator is not None and (state["round"] % cfg.eval_interval == 0 or state["round"] >= total_rounds):
                evals = _evaluate(evaluator, actor, state, cfg, strategy, writer, tokenizer, out_dir)

            # ---- checkpoint / stop
            if cfg.save_interval > 0 and state["round"] % cfg.save_interval == 0 and state["round"] < total_rounds:
                _save_state(strategy, engines, ema, ckpt_root, state, kl_ctl, reward_stats, cfg)
            if state["round"] >= total_rounds or stop_reason:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            if state["round"] == rounds_at_epoch_start and not buffer:
                stop_reason = "a whole pass over the prompts produced no trainable experience"
            continue
        if state["round"] >= total_rounds or stop_reason:
            break
    bar.close()
    if stop_reason:
        print_rank0(f"step 3 stopped: {stop_reason}")
    if failed:
        _stop_failed(cfg, strategy, writer, actor, critic, ema, tokenizer, out_dir, ckpt_root, stop_reason)

    # ---- final checkpoints
    extra = {"step": "ppo", "algo": cfg.algo, **{k: v for k, v in vars(cfg).items() if not k.startswith("_")},
             "chat_format": chat_format(cfg, tokenizer).record()}
    strategy.save_hf(actor, tokenizer, out_dir / "actor", extra_config=extra, save_lora_adapter=cfg.save_lora_adapter)
    if critic is not None:
        strategy.save_hf(critic, tokenizer, out_dir / "critic", extra_config=extra,
                         save_lora_adapter=cfg.save_lora_adapter)
    if ema is not None:
        strategy.save_hf(ema, tokenizer, out_dir / "actor_ema", extra_config=extra)
    summary = {k: v for k, v in last.items() if isinstance(v, (int, float))}
    summary.update(steps=state["round"], optimizer_steps=state["trained_rounds"], stopped_reason=stop_reason or None,
                   reused_experience_forward=reuse_fwd, **{f"eval_{k}": v for k, v in evals.items()})
    if state["best"] is not None:
        summary.update(best_eval=state["best"], best_eval_step=state["best_round"])
    writer.close()
    strategy.barrier()
    common.write_done(out_dir, "ppo", summary)
    return summary


# ------------------------------------------------------------------------------------------------ loop helpers
def _evaluate(evaluator: PolicyEval, actor, state: dict, cfg: PPOConfig, strategy, writer, tokenizer,
              out_dir: Path) -> dict[str, float]:
    """One evaluation: logged as eval/* at this step; with --save_best_by, a better value saves OUTPUT/best_actor."""
    metrics, samples = evaluator(actor)
    writer.log("eval", state["round"], **metrics)
    print_rank0(f"eval at step {state['round']}: " + " | ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
    if cfg.print_answers:
        for q, a in samples:
            print_rank0(f"--- eval prompt: {q!r}\n--- eval answer: {a!r}")
    if cfg.save_best_by:
        try:
            name, value, higher = metric_value(metrics, cfg.save_best_by)
        except KeyError as e:
            raise UserError(str(e.args[0])) from None
        best = state["best"]
        if best is None or (value > best if higher else value < best):
            state["best"], state["best_round"] = value, state["round"]
            extra = {"step": "ppo", "algo": cfg.algo, "best_by": cfg.save_best_by, "best_value": value,
                     "best_step": state["round"], "chat_format": chat_format(cfg, tokenizer).record()}
            strategy.save_hf(actor, tokenizer, out_dir / "best_actor", extra_config=extra)
            print_rank0(f"best {name} so far ({value:.4g} at step {state['round']}): saved {out_dir / 'best_actor'}")
    return metrics


def _length_guard(state: dict, cfg: PPOConfig, t: dict, strategy) -> str:
    """The stop reason once every answer of --length_guard_steps consecutive generation batches (all ranks) was
    empty or ran to the length limit without EOS; '' otherwise. Lengths the flags force are not a collapse."""
    if not cfg.length_guard_steps:
        return ""
    lengths = t["answer_tokens"]
    n, short, cut = strategy.all_reduce_sum(torch.tensor(
        [len(lengths), int((lengths <= cfg.length_guard_min_tokens).sum()), t["truncated"]])).tolist()
    kind = ""
    if short == n and cfg.max_answer_seq_len > cfg.length_guard_min_tokens:
        kind = "empty"
    elif cut == n and cfg.min_new_tokens < cfg.max_answer_seq_len:
        kind = "max"
    state["length_streak"] = (state["length_streak"] + 1 if kind == state["length_kind"] else 1) if kind else 0
    state["length_kind"] = kind
    if not kind or state["length_streak"] < cfg.length_guard_steps:
        return ""
    what = (f"every answer had at most {cfg.length_guard_min_tokens} token(s)" if kind == "empty" else
            f"every answer ran to --max_answer_seq_len {cfg.max_answer_seq_len} without an end-of-text token")
    return (f"answer length collapsed: {what} in {state['length_streak']} consecutive generation batches "
            "(--length_guard_steps; 0 turns this guard off)")


def _stop_failed(cfg: PPOConfig, strategy, writer, actor, critic, ema, tokenizer, out_dir: Path, ckpt_root: Path,
                 reason: str) -> None:
    """A run stopped by the non-finite or length guard is not finished: no done.json, and UserError (exit 2) naming
    the reason and the last good checkpoint. Finite weights (a length collapse) are saved for inspection; blown-up
    ones are not, so the run's output holds nothing non-finite."""
    from chatrlhf.engine.strategy import find_latest_checkpoint

    blown_up = reason.startswith("non-finite")
    if not blown_up:
        extra = {"step": "ppo", "algo": cfg.algo, "stopped_reason": reason,
                 **{k: v for k, v in vars(cfg).items() if not k.startswith("_")}}
        for name, model in (("actor", actor), ("critic", critic), ("actor_ema", ema)):
            if model is not None:
                strategy.save_hf(model, tokenizer, out_dir / name, extra_config=extra)
    writer.close()
    strategy.barrier()
    good = find_latest_checkpoint(ckpt_root)
    keep = (f"the last {'good ' if blown_up else ''}checkpoint is {good}" if good is not None
            else "no checkpoint was saved before it (--save_interval)")
    if not blown_up:
        keep = f"the models as they ended are in {out_dir} for inspection; {keep}"
    raise UserError(f"step 3 stopped: {reason}; {keep}; done.json not written")


def _skip(state: dict, cfg: PPOConfig, reason: str) -> str:
    state["consecutive_skips"] += 1
    print_rank0(f"step {state['round'] + 1}: skipped ({reason}); {state['consecutive_skips']} in a row")
    if state["consecutive_skips"] >= cfg.max_consecutive_skips:
        return f"{state['consecutive_skips']} consecutive skipped steps, last: {reason}"
    return ""


def _micro_batches(buffer: list[px.Experience], cfg: PPOConfig, round_idx: int) -> list[px.Experience]:
    """Each experience batch split into ceil(nominal rows / training batch) micro-batches. The count depends only
    on the config, so every rank runs the same number of steps; rows are shuffled (and repeated when answers
    were dropped). GRPO/RLOO rows carry their own advantages, so groups may be split."""
    out = []
    nominal = cfg.per_device_generation_batch_size * cfg.group_size
    n_micro = math.ceil(nominal / cfg.per_device_training_batch_size)
    g = torch.Generator().manual_seed(cfg.seed * 7919 + round_idx)
    for e in buffer:
        if e.graph is not None:  # its forward is already done: one micro-batch, rows in place (the loss is a mean)
            out.append(e)
            continue
        idx = torch.randperm(len(e), generator=g)
        if len(idx) < n_micro:
            idx = idx.repeat(math.ceil(n_micro / len(idx)))[:n_micro]
        for chunk in torch.tensor_split(idx, n_micro):
            out.append(e.select(chunk.to(e.seq.device)))
    return out


def _experience_stats(buffer: list[px.Experience], strategy) -> dict:
    """Reward/KL/length over every rank's real rows (placeholders excluded)."""
    rows = [e for e in buffer if not e.info.get("placeholder")]
    s = torch.zeros(6)
    for e in rows:
        mask = e.action_mask[:, e.start:]
        kl = ((e.logprobs - e.ref_logprobs)[:, e.start:] * mask).sum(1)
        s += torch.stack([torch.tensor(float(len(e))), e.reward_score.sum().cpu(), (e.reward_score ** 2).sum().cpu(),
                          kl.sum().cpu(), e.info["response_length"].sum().cpu(), torch.tensor(0.0)]).float()
    s = strategy.all_reduce_sum(s).cpu()
    n = max(float(s[0]), 1.0)
    mean = float(s[1]) / n
    var = max(float(s[2]) / n - mean**2, 0.0) * (n / max(n - 1, 1))
    out = {"n": int(s[0]), "reward_mean": mean, "reward_std": math.sqrt(var), "kl": float(s[3]) / n,
           "response_length": float(s[4]) / n}
    for part in ("rm_score", "fn_score"):  # the reward model's and --reward_fn's shares, when both score
        if buffer and part in buffer[0].info:
            total = sum((e.info[part].sum().cpu() for e in rows), torch.tensor(0.0))
            out[part] = float(strategy.all_reduce_sum(total).cpu()) / n
    return out


def _aggregate(results: list[px.MicroStepResult], strategy, critic: bool = True) -> dict:
    if not results:
        return {}
    keys = ["actor_loss", "critic_loss", "clipfrac", "vf_clipfrac", "approx_kl", "entropy", "value_error"]
    t = torch.tensor([[getattr(r, k) for k in keys] for r in results]).mean(0)
    t = strategy.all_reduce_mean(t).cpu()
    out = {k: float(v) for k, v in zip(keys, t)
           if critic or k not in ("critic_loss", "vf_clipfrac", "value_error")}  # GRPO/RLOO have no critic
    out["ratio_max"] = _all_reduce_max(strategy, max(r.ratio_max for r in results))
    return out


def _throughput(timing: dict, e2e: float, cfg: PPOConfig, strategy, a_dims, c_dims, r_dims, stats: dict,
                reused_forward: bool = False) -> dict:
    """Honest per-rank figures: end-to-end = generation + every forward pass for experience (actor, reference,
    critic, reward) + training (+ ptx), all on this rank; samples/s counts every rank's rows (n_rows global).
    ``reused_forward``: training is backward only (its forward is counted with the experience)."""
    la, ha, va, pa = a_dims
    rows = max(1, timing["rows"])
    seq = max(1, int(timing["seq_tokens"] / rows))  # mean prompt + answer length actually processed
    k_a = (4 if cfg.actor_gradient_checkpointing else 3) - reused_forward
    gen_flops = px.flops_per_pass(la, ha, va, rows, seq, 1)
    infer_flops = 2 * px.flops_per_pass(la, ha, va, rows, seq, 1)  # actor + reference
    if r_dims is not None:  # no reward model with --reward_model_name_or_path none
        infer_flops += px.flops_per_pass(r_dims[0], r_dims[1], r_dims[2], rows, seq, 1)
    train_flops = cfg.ppo_epochs * px.flops_per_pass(la, ha, va, rows, seq, k_a)
    if c_dims is not None:
        k_c = (4 if cfg.critic_gradient_checkpointing else 3) - reused_forward
        infer_flops += px.flops_per_pass(c_dims[0], c_dims[1], c_dims[2], rows, seq, 1)
        train_flops += cfg.ppo_epochs * px.flops_per_pass(c_dims[0], c_dims[1], c_dims[2], rows, seq, k_c)
    gen_s, tr_s = max(timing["generation_s"], 1e-9), max(timing["training_s"], 1e-9)
    e2e = max(e2e, 1e-9)
    gen_tokens = max(1, timing["gen_tokens"])
    bytes_per = 4 if strategy.cfg.dtype == "fp32" else 2
    # every decode step reads all actor weights once
    bw = pa * bytes_per * gen_tokens / gen_s / 1e9
    global_rows = stats["n"]
    out = {"e2e_latency_s": e2e, "e2e_tflops": (gen_flops + infer_flops + train_flops) / e2e / 1e12,
           "samples_per_s": global_rows / e2e, "generation_latency_s": gen_s,
           "generation_per_token_latency_s": gen_s / gen_tokens, "generation_tflops": gen_flops / gen_s / 1e12,
           "generation_bw_gbs": bw, "inference_latency_s": timing["inference_s"], "training_latency_s": tr_s,
           "training_tflops": train_flops / tr_s / 1e12, "actor_params_b": pa / 1e9}
    out["_lines"] = (
        f"End-to-End => Latency: {e2e:.2f}s, TFLOPs: {out['e2e_tflops']:.4f}, Samples/sec: {out['samples_per_s']:.2f}, "
        f"Time/seq {e2e / max(global_rows, 1):.3f}s, Batch Size: {global_rows}, Total Seq. Length: {seq}\n"
        f"Generation => Latency: {gen_s:.2f}s, Per-token Latency {gen_s / gen_tokens * 1000:.2f} ms, TFLOPs: "
        f"{out['generation_tflops']:.4f}, BW: {bw:.2f} GB/sec, Answer Seq. Length: {gen_tokens}\n"
        f"Training   => Latency: {tr_s:.2f}s, TFLOPs: {out['training_tflops']:.4f} "
        f"(experience forward passes: {timing['inference_s']:.2f}s; figures are this rank's)")
    return out


def _align_overflow_note(cfg: PPOConfig) -> None:
    # fp16 only (refused on CPU): DeepSpeed's fp16 optimizers skip overflowing steps themselves; with bf16/fp32
    # the non-finite-loss guard skips actor and critic together, which is what --align_overflow asks for.
    return None


def _save_state(strategy, engines, ema, ckpt_root: Path, state: dict, kl_ctl, reward_stats, cfg: PPOConfig) -> None:
    client = {**state, "kl_ctl": kl_ctl.state_dict(), "reward_stats": reward_stats.state_dict()}
    sdir = strategy.save_state(engines, ckpt_root, state["round"], client_state=client,
                               keep_last=cfg.keep_last_checkpoints)
    if ema is not None:
        sd = _named_params_rank0(ema, strategy)
        if strategy.is_rank0:
            from safetensors.torch import save_file

            save_file(sd, str(sdir / "actor_ema.safetensors"))
        strategy.barrier()


def main(argv: list[str] | None = None) -> int:
    from chatrlhf.config import parse_config

    cfg = parse_config(PPOConfig, argv, prog="chatrlhf ppo",
                       description="Step 3: RLHF with PPO (or --algo grpo|rloo) on a step-1 actor and a step-2 "
                                   "reward model.")
    return common.run_main(run_ppo, cfg)
