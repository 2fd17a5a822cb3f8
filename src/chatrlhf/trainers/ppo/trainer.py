"""Step 3: RLHF with PPO (DeepSpeed-Chat's math by default), or critic-free GRPO / RLOO / REINFORCE++ with ``--algo``.

Models: actor (step-1 checkpoint, trained), reference (a frozen copy of it), critic (the step-2 reward model,
trained; PPO only), reward model (step 2, frozen), optional EMA of the actor. ``PPOTrainer(cfg)`` builds them, the
prompt data and the math objects, and resumes from the latest checkpoint; :meth:`PPOTrainer.train` is the loop:

    train()         for each prompt batch (epoch after epoch, from where a resumed run stopped), until the last
                    step, the end of the epochs, repeated skips or a failed stop:
      rollout         generate -> length guard (a collapsed answer length fails the run) -> drop answers with <= 1
                      real token -> score (reward model and/or --reward_fn), log-probs, values; buffered
      step()          when generation_batches are buffered:
        advantages      KL guard (skips the step), then rewards + GAE (PPO) or group baselines (critic-free)
        update          ppo_epochs passes over shuffled micro-batches: actor (+ critic) step, ptx step, EMA update
        log_step        metrics, the step line, answers; a step whose micro-steps were all skipped is a skip
        _blew_up        non-finite weights or outputs fail the run
        evaluate        every eval_interval (the best actor kept); save_checkpoint every save_interval
    finish()        save actor, critic, actor_ema (Hugging Face dirs) and done.json; a failed run exits 2 without it

Flags live in :mod:`chatrlhf.trainers.ppo.config`, math in :mod:`chatrlhf.algo.rlhf_math`, experience and
micro-steps in :mod:`chatrlhf.trainers.ppo.experience`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from chatrlhf.algo.rlhf_math import AdaptiveKLController, FixedKLController, PolicyLoss, RunningMoments, ValueLoss
from chatrlhf.config import parse_config
from chatrlhf.data import PromptCollator, build_phase_datasets
from chatrlhf.data.phases import chat_format
from chatrlhf.errors import UserError
from chatrlhf.models.dims import flops_per_pass, model_dims
from chatrlhf.trainers import common
from chatrlhf.trainers.checkpoints import resolve_resume, write_done
from chatrlhf.trainers.metrics import MetricsWriter
from chatrlhf.trainers.ppo import experience as px
from chatrlhf.trainers.ppo.components import (config_record, load_actor_like, load_named_params, load_reward_like,
                                              load_tokenizers, micro_batches_per_round, named_params_rank0, ptx_batches,
                                              reuses_experience_forward, rounds_per_epoch, train_view)
from chatrlhf.trainers.ppo.config import PPOConfig
from chatrlhf.trainers.ppo.evaluation import PolicyEval, metric_value
from chatrlhf.trainers.ppo.rewards import Scorer, load_function
from chatrlhf.utils import find_latest_checkpoint, print_rank0

__all__ = ["PPOConfig", "PPOTrainer", "RunState", "main", "run_ppo"]


def run_ppo(cfg: PPOConfig) -> dict:
    cfg.validate()
    trainer = PPOTrainer(cfg)
    trainer.train()
    return trainer.finish()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(PPOConfig, argv, prog="chatrlhf ppo",
                       description="Step 3: RLHF with PPO (or --algo grpo|rloo) on a step-1 actor and a step-2 "
                                   "reward model.")
    return common.run_main(run_ppo, cfg)


@dataclass
class RunState:
    """The loop's counters: saved with each checkpoint (its client state, in this order) and restored on resume."""

    round: int = 0  # steps taken, trained or skipped (a step trains on generation_batches generation batches)
    epoch: int = 0
    batch_in_epoch: int = 0  # prompt batches of this epoch already generated from
    ema_reward: float | None = None
    consecutive_skips: int = 0
    trained_rounds: int = 0  # steps in which at least one micro-step updated the weights (the guards may skip all)
    length_streak: int = 0  # consecutive generation batches whose answers all collapsed ...
    length_kind: str = ""  # ... this way ("empty" or "max")
    best: float | None = None  # the best --save_best_by value so far, and its step
    best_round: int | None = None


class PPOTrainer:
    """One step-3 run: ``PPOTrainer(cfg)`` builds the data, the models and the math objects and resumes from the
    latest checkpoint; :meth:`train` runs the loop; :meth:`finish` publishes the models and returns the summary."""

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.out_dir = Path(cfg.output_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.strategy = common.build_strategy(cfg, zero_stage=cfg.actor_zero_stage,
                                              micro_batch=cfg.per_device_training_batch_size)
        self.rank0 = self.strategy.is_rank0
        self.tokenizer, reward_path = load_tokenizers(cfg)
        self._build_data()
        self._build_models(reward_path)
        self.unsup_iter = ptx_batches(cfg, self.tokenizer, self.strategy)
        self._build_math()
        self.state = RunState()
        self.resume_dir = self._resume()
        self._open_logs()
        self.reuse_fwd = reuses_experience_forward(cfg, self.actor, self.critic)
        self.last: dict[str, Any] = {}  # the last step's metrics (the summary's)
        self.evals: dict[str, float] = {}  # the last evaluation's metrics
        self.stop_reason = ""
        self.failed = False  # a stop that leaves no finished run: weights blew up, or the answers' length collapsed
        self.buffer: list[px.Experience] = []  # experience batches of the step being gathered
        self.generated: list[tuple[str, str]] = []  # (prompt text, answer text) of the step, for --print_answers
        self.timing = _new_timing()
        self.round_t0 = time.time()

    # ------------------------------------------------------------------------------------------------ the loop
    def train(self) -> None:
        """A rollout per prompt batch and a step per generation_batches rollouts, until the last step, the end of
        the epochs or a stop."""
        if self.evaluator is not None and self.resume_dir is None:
            self.evaluate()  # the starting point of the eval curve
        self.round_t0 = time.time()
        prompt_batches = self._prompt_batches()
        while self.state.round < self.total_rounds and not self.stop_reason:
            batch = next(prompt_batches, None)
            if batch is None:
                break  # every epoch done, or a whole pass over the prompts gave nothing to train on
            exp = self.rollout(batch)
            if exp is None:
                continue  # no trainable answer in the batch, or the length guard stopped the run
            self.buffer.append(exp)
            if len(self.buffer) == self.cfg.generation_batches:
                self.step()

    def step(self) -> None:
        """One step on the buffered experience: advantages -> update -> log -> non-finite guard -> evaluation and
        checkpoint. A KL to the reference above --max_kl skips it (nothing trained, the step still counts)."""
        cfg, st = self.cfg, self.state
        stats = _experience_stats(self.buffer, self.strategy)
        if cfg.max_kl and stats["kl"] > cfg.max_kl:
            self.buffer.clear()
            self.stop_reason = self._skip(f"KL to reference {stats['kl']:.3g} > --max_kl {cfg.max_kl:g}")
            st.round += 1
            self.bar.update(1)
            return
        uniform = self.advantages()
        results, unsup_losses, probe = self.update()
        self.kl_ctl.update(stats["kl"], stats["n"])
        st.round += 1
        self.bar.update(1)
        trained = self.log_step(stats, results, unsup_losses, uniform)
        if trained and self._blew_up(probe):
            return
        if self.evaluator is not None and (st.round % cfg.eval_interval == 0 or st.round >= self.total_rounds):
            self.evaluate()
        if cfg.save_interval > 0 and st.round % cfg.save_interval == 0 and st.round < self.total_rounds:
            self.save_checkpoint()

    def _prompt_batches(self) -> Iterator[dict]:
        """Prompt batches, epoch after epoch, from where the run (or the checkpoint it resumed) stands. A whole pass
        that produced no step (and left nothing buffered) stops the run."""
        cfg, st, loader = self.cfg, self.state, self.prompt_loader
        max_epochs = cfg.num_train_epochs if cfg.max_steps <= 0 else 10**9
        while st.epoch < max_epochs:
            rounds_at_epoch_start, whole_pass = st.round, st.batch_in_epoch == 0
            loader.sampler.set_epoch(st.epoch)
            loader.sampler.set_start(st.batch_in_epoch * cfg.per_device_generation_batch_size)
            for batch in loader:
                st.batch_in_epoch += 1
                yield batch
            st.epoch += 1
            st.batch_in_epoch = 0
            # a resumed run's first pass may be the (empty) rest of an epoch its checkpoint ended
            if whole_pass and st.round == rounds_at_epoch_start and not self.buffer:
                self.stop_reason = "a whole pass over the prompts produced no trainable experience"
                return

    # ------------------------------------------------------------------------------------------------ phases
    def rollout(self, batch: dict) -> px.Experience | None:
        """Experience from one prompt batch: answers generated and scored, log-probs, values. None when the length
        guard stops the run, or when no answer of the batch on any rank has more than one real token."""
        cfg, st = self.cfg, self.state
        batch = common.to_device(batch, self.strategy.device)
        exp, t = px.make_experience(self.actor, self.ref, self.critic, self.scorer, self.strategy, self.tokenizer,
                                    batch["prompt_input_ids"], batch["prompt_attention_mask"], self.gen_params,
                                    cfg.group_size, train_forward=self.reuse_fwd,
                                    entropy_grad=self.policy_loss.entropy_coef != 0, prompts=batch.get("prompt"),
                                    metas=batch.get("meta"))
        _add_rollout_timing(self.timing, t)
        # counted per generation batch, before the short-answer drop: a batch of only empty answers is skipped
        # below without a step, and would otherwise go unnoticed until a whole pass produced nothing
        self.stop_reason = _length_guard(st, cfg, t, self.strategy)
        if self.stop_reason:
            self.failed = True
            return None
        if self.strategy.all_reduce_sum(0 if exp.info["placeholder"] else len(exp)).item() == 0:
            print_rank0(f"step {st.round + 1}: every answer of this generation batch had <= 1 real token; batch "
                        "skipped")
            return None
        if self.rank0 and cfg.print_answers and (st.round + 1) % cfg.print_answers_interval == 0:
            p = exp.prompt_len
            self.generated.append((self.tokenizer.decode(exp.seq[0, :p], skip_special_tokens=True),
                                   self.tokenizer.decode(exp.seq[0, p:][exp.attention_mask[0, p:].bool()],
                                                         skip_special_tokens=True)))
        return exp

    def advantages(self) -> int:
        """Rewards and advantages of the buffered experience, in place: KL-penalised rewards + GAE (PPO) or group
        baselines (critic-free). Returns how many samples of equal-reward groups left the loss
        (--drop_uniform_groups)."""
        cfg = self.cfg
        normalize = self._normalized_score if cfg.reward_normalization != "none" else None
        uniform = 0
        for e in self.buffer:
            if cfg.algo == "ppo":
                px.finalize_ppo(e, self.kl_ctl.value, cfg.clip_reward_value, cfg.gamma, cfg.lam, cfg.kl_estimator,
                                normalize, cfg.whiten_advantages)
            else:
                px.finalize_group(e, cfg.algo, cfg.group_size, self.kl_ctl.value, cfg.clip_reward_value,
                                  cfg.kl_estimator, normalize, cfg.drop_uniform_groups)
                uniform += e.info.get("uniform_dropped", 0)
        return uniform

    def _normalized_score(self, score: torch.Tensor) -> torch.Tensor:
        """--reward_normalization: the running statistics take the batch in, then normalize or scale it."""
        self.reward_stats.update(score)
        if self.cfg.reward_normalization == "normalize":
            return self.reward_stats.normalize(score)
        return self.reward_stats.scale(score)

    def update(self) -> tuple[list[px.MicroStepResult], list[float], px.Experience]:
        """ppo_epochs passes over the buffered experience in shuffled micro-batches: an actor (+ critic) step each,
        then, unless the guard skipped it, a ptx step and the EMA update. Empties the buffer; returns the
        micro-steps' results, the ptx losses and the last micro-batch (the non-finite guard's probe)."""
        cfg, st, strategy = self.cfg, self.state, self.strategy
        t0 = time.time()
        micro = _micro_batches(self.buffer, cfg, st.round)
        results, unsup_losses = [], []
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        kl_in_loss = self.kl_ctl.value if cfg.algo == "grpo" else 0.0  # GRPO's KL is in the loss, not the reward
        for ep in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(cfg.seed * 1000 + st.round * 10 + ep)
            for i in torch.randperm(len(micro), generator=g).tolist():
                r = px.train_micro_batch(micro[i], self.actor, self.critic, strategy, self.policy_loss,
                                         self.value_loss, cfg.algo, kl_coef_in_loss=kl_in_loss,
                                         max_ratio=cfg.max_ratio)
                if r.skipped:
                    print_rank0(f"step {st.round + 1}: micro-step skipped ({r.skipped})")
                elif self.unsup_iter is not None:
                    ub = common.to_device(next(self.unsup_iter), strategy.device)
                    unsup_losses.append(px.train_unsupervised(ub, self.actor, strategy, cfg.unsup_coef))
                if self.ema is not None and not r.skipped:
                    px.ema_update(self.actor, self.ema, strategy, cfg.ema_beta)
                results.append(r)
        self.timing["training_s"] += time.time() - t0
        self.buffer.clear()
        return results, unsup_losses, micro[-1]

    def log_step(self, stats: dict, results: list[px.MicroStepResult], unsup_losses: list[float],
                 uniform: int) -> bool:
        """The step's train/* and throughput/* metrics, the step line and the answers to print; a step whose every
        micro-step the guard skipped counts as a skip. Returns whether any micro-step updated the weights."""
        cfg, st, strategy = self.cfg, self.state, self.strategy
        done = [r for r in results if not r.skipped]
        if not done:
            self.stop_reason = self._skip(results[0].skipped if results else "no micro-batches")
        else:
            st.consecutive_skips = 0
            st.trained_rounds += 1
        agg = _aggregate(done, strategy, critic=cfg.algo == "ppo")
        st.ema_reward = (stats["reward_mean"] if st.ema_reward is None
                         else 0.9 * st.ema_reward + 0.1 * stats["reward_mean"])
        self.last = {**stats, **agg, "ema_reward": st.ema_reward, "kl_coef": self.kl_ctl.value,
                     "skipped": len(results) - len(done),
                     **({"uniform_dropped": uniform} if cfg.drop_uniform_groups else {}),
                     "actor_lr": strategy.get_lr(self.actor)[0],
                     **({"unsup_loss": sum(unsup_losses) / len(unsup_losses)} if unsup_losses else {})}
        self.last.pop("n", None)
        self.writer.log("train", st.round, **self.last)
        tput = _throughput(self.timing, time.time() - self.round_t0, cfg, strategy, *self.dims, stats,
                           self.reuse_fwd)
        tput["dropped_answers"] = self.timing["dropped"]
        self.writer.log("throughput", st.round, **tput)
        self._print_step(tput.pop("_lines"))
        self.timing = _new_timing()
        self.round_t0 = time.time()
        return bool(done)

    def _print_step(self, throughput_lines: str) -> None:
        """Every --log_interval steps (and the first and last): the step line and the throughput lines; then the
        answers gathered for --print_answers."""
        cfg, st, last = self.cfg, self.state, self.last
        if self.rank0 and (st.round % max(1, cfg.log_interval) == 0 or st.round == 1 or st.round == self.total_rounds):
            print_rank0(f"step {st.round}/{self.total_rounds} | reward {last['reward_mean']:.4f} "
                        f"(ema {last['ema_reward']:.4f}) | kl {last['kl']:.4f} | actor_loss "
                        f"{last.get('actor_loss', float('nan')):.4f} | "
                        + (f"critic_loss {last.get('critic_loss', float('nan')):.4f} | " if cfg.algo == "ppo" else "")
                        + f"clipfrac {last.get('clipfrac', 0):.3f} | "
                        f"ratio_max {last.get('ratio_max', 0):.3f} | len {last['response_length']:.1f}"
                        + (f" | dropped {self.timing['dropped']} short" if self.timing["dropped"] else ""))
            print_rank0(throughput_lines)
        for q, a in self.generated:
            print_rank0(f"--- prompt: {q!r}\n--- answer: {a!r}")
        self.generated.clear()

    def _skip(self, reason: str) -> str:
        """Count a skipped step; the stop reason once --max_consecutive_skips are in a row, '' otherwise."""
        st = self.state
        st.consecutive_skips += 1
        print_rank0(f"step {st.round + 1}: skipped ({reason}); {st.consecutive_skips} in a row")
        if st.consecutive_skips >= self.cfg.max_consecutive_skips:
            return f"{st.consecutive_skips} consecutive skipped steps, last: {reason}"
        return ""

    def _blew_up(self, probe: px.Experience) -> bool:
        """The non-finite guard: the weights just written must still give finite outputs, else the next generation
        samples from NaN probabilities (and no checkpoint of this step may be saved). Stops the run as failed."""
        bad = px.nonfinite_after_update(self.actor, self.critic, probe, self.strategy)
        if bad:
            self.stop_reason, self.failed = f"non-finite {bad} after the update of step {self.state.round}", True
        return bool(bad)

    def evaluate(self) -> None:
        """One evaluation by code, not only by the reward model: logged as eval/* at this step; with --save_best_by,
        a better value saves OUTPUT/best_actor."""
        cfg, st = self.cfg, self.state
        metrics, samples = self.evaluator(self.actor)
        self.writer.log("eval", st.round, **metrics)
        print_rank0(f"eval at step {st.round}: " + " | ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
        if cfg.print_answers:
            for q, a in samples:
                print_rank0(f"--- eval prompt: {q!r}\n--- eval answer: {a!r}")
        if cfg.save_best_by:
            try:
                name, value, higher = metric_value(metrics, cfg.save_best_by)
            except KeyError as e:
                raise UserError(str(e.args[0])) from None
            if st.best is None or (value > st.best if higher else value < st.best):
                st.best, st.best_round = value, st.round
                extra = {"step": "ppo", "algo": cfg.algo, "best_by": cfg.save_best_by, "best_value": value,
                         "best_step": st.round, "chat_format": chat_format(cfg, self.tokenizer).record()}
                self.strategy.save_hf(self.actor, self.tokenizer, self.out_dir / "best_actor", extra_config=extra)
                print_rank0(f"best {name} so far ({value:.4g} at step {st.round}): saved {self.out_dir / 'best_actor'}")
        self.evals = metrics

    def save_checkpoint(self) -> None:
        """Engines, counters, KL controller and reward statistics (DeepSpeed checkpoint), and the EMA's weights."""
        client = {**dataclasses.asdict(self.state), "kl_ctl": self.kl_ctl.state_dict(),
                  "reward_stats": self.reward_stats.state_dict()}
        sdir = self.strategy.save_state(self.engines, self.ckpt_root, self.state.round, client_state=client,
                                        keep_last=self.cfg.keep_last_checkpoints)
        if self.ema is not None:
            sd = named_params_rank0(self.ema, self.strategy)
            if self.strategy.is_rank0:
                from safetensors.torch import save_file  # lazy: safetensors (EMA checkpoints only)

                save_file(sd, str(sdir / "actor_ema.safetensors"))
            self.strategy.barrier()

    # ------------------------------------------------------------------------------------------------ the end
    def finish(self) -> dict:
        """Publish actor, critic and actor_ema (Hugging Face dirs) and done.json; returns the summary. A run a guard
        failed raises instead (exit 2, no done.json)."""
        cfg, st, strategy = self.cfg, self.state, self.strategy
        self.bar.close()
        if self.stop_reason:
            print_rank0(f"step 3 stopped: {self.stop_reason}")
        if self.failed:
            self._stop_failed()
        extra = {"step": "ppo", "algo": cfg.algo, **config_record(cfg),
                 "chat_format": chat_format(cfg, self.tokenizer).record()}
        strategy.save_hf(self.actor, self.tokenizer, self.out_dir / "actor", extra_config=extra,
                         save_lora_adapter=cfg.save_lora_adapter)
        if self.critic is not None:
            strategy.save_hf(self.critic, self.tokenizer, self.out_dir / "critic", extra_config=extra,
                             save_lora_adapter=cfg.save_lora_adapter)
        if self.ema is not None:
            strategy.save_hf(self.ema, self.tokenizer, self.out_dir / "actor_ema", extra_config=extra)
        summary = {k: v for k, v in self.last.items() if isinstance(v, (int, float))}
        summary.update(steps=st.round, optimizer_steps=st.trained_rounds, stopped_reason=self.stop_reason or None,
                       reused_experience_forward=self.reuse_fwd, **{f"eval_{k}": v for k, v in self.evals.items()})
        if st.best is not None:
            summary.update(best_eval=st.best, best_eval_step=st.best_round)
        self.writer.close()
        strategy.barrier()
        write_done(self.out_dir, "ppo", summary)
        return summary

    def _stop_failed(self) -> None:
        """A run stopped by the non-finite or length guard is not finished: no done.json, and UserError (exit 2)
        naming the reason and the last good checkpoint. Finite weights (a length collapse) are saved for inspection;
        blown-up ones are not, so the run's output holds nothing non-finite."""
        reason = self.stop_reason
        blown_up = reason.startswith("non-finite")
        if not blown_up:
            extra = {"step": "ppo", "algo": self.cfg.algo, "stopped_reason": reason, **config_record(self.cfg)}
            for name, model in (("actor", self.actor), ("critic", self.critic), ("actor_ema", self.ema)):
                if model is not None:
                    self.strategy.save_hf(model, self.tokenizer, self.out_dir / name, extra_config=extra)
        self.writer.close()
        self.strategy.barrier()
        good = find_latest_checkpoint(self.ckpt_root)
        keep = (f"the last {'good ' if blown_up else ''}checkpoint is {good}" if good is not None
                else "no checkpoint was saved before it (--save_interval)")
        if not blown_up:
            keep = f"the models as they ended are in {self.out_dir} for inspection; {keep}"
        raise UserError(f"step 3 stopped: {reason}; {keep}; done.json not written")

    # ------------------------------------------------------------------------------------------------ set-up
    def _build_data(self) -> None:
        """Step-3 prompts (train and eval splits), the prompt loader, and the run's length in steps."""
        cfg = self.cfg
        self.train_ds, self.eval_ds = build_phase_datasets(3, cfg, self.tokenizer)
        if len(self.train_ds) == 0:
            raise UserError("no step-3 prompts (check --data_path / --data_split / --max_prompt_seq_len)")
        self.prompt_loader = common.make_dataloader(self.train_ds, PromptCollator(self.tokenizer.pad_token_id),
                                                    cfg.per_device_generation_batch_size, self.strategy,
                                                    shuffle=True, seed=cfg.seed)
        self.per_epoch = rounds_per_epoch(len(self.prompt_loader), cfg)
        self.total_rounds = cfg.max_steps if cfg.max_steps > 0 else self.per_epoch * cfg.num_train_epochs
        if cfg.enable_test_mode and cfg.test_stop_step > 0:
            self.total_rounds = min(self.total_rounds, cfg.test_stop_step)

    def _build_models(self, reward_path: str) -> None:
        """Actor (+ optimizer), reference, EMA, critic (+ optimizer; PPO only), the frozen reward model (none when
        ``reward_path`` is ''), and the scorer and evaluator on them. Under ZeRO-3 the frozen copies are partitioned
        like the model they follow."""
        cfg, strategy, tok = self.cfg, self.strategy, self.tokenizer
        opt_steps = max(1, self.total_rounds * cfg.ppo_epochs * micro_batches_per_round(cfg)
                        // cfg.gradient_accumulation_steps)
        actor_frozen_stage = 3 if cfg.actor_zero_stage == 3 else 0
        critic_frozen_stage = 3 if cfg.critic_zero_stage == 3 else 0
        actor = load_actor_like(cfg, strategy, tok, cfg.actor_zero_stage, train=True, lora=cfg.actor_lora_dim > 0)
        a_opt, a_sched = common.create_optimizer_and_scheduler(strategy, actor, train_view(cfg, "actor"), opt_steps)
        self.actor = strategy.prepare(actor, a_opt, a_sched, zero_stage=cfg.actor_zero_stage)
        ref = load_actor_like(cfg, strategy, tok, actor_frozen_stage, train=False, lora=False)
        self.ref = strategy.prepare_eval(ref, zero_stage=actor_frozen_stage, offload=cfg.offload_reference_model)
        self.ema = None
        if cfg.enable_ema:
            ema = load_actor_like(cfg, strategy, tok, actor_frozen_stage, train=False, lora=cfg.actor_lora_dim > 0)
            self.ema = strategy.prepare_eval(ema, zero_stage=actor_frozen_stage)
            px.ema_update(self.actor, self.ema, strategy, beta=0.0)  # the actor's exact weights (LoRA init included)
        self.critic = None
        if cfg.algo == "ppo":
            critic = load_reward_like(cfg, strategy, cfg.critic_model_name_or_path, cfg.critic_zero_stage, train=True)
            c_opt, c_sched = common.create_optimizer_and_scheduler(strategy, critic, train_view(cfg, "critic"),
                                                                   opt_steps)
            self.critic = strategy.prepare(critic, c_opt, c_sched, zero_stage=cfg.critic_zero_stage)
        self.reward_model = None
        if reward_path:
            reward_model = load_reward_like(cfg, strategy, reward_path, critic_frozen_stage, train=False)
            self.reward_model = strategy.prepare_eval(reward_model, zero_stage=critic_frozen_stage,
                                                      offload=cfg.offload_reward_model)
        self.scorer = Scorer(tok, self.reward_model,
                             load_function(cfg.reward_fn, "--reward_fn") if cfg.reward_fn else None, cfg.reward_fn,
                             cfg.reward_model_weight, cfg.reward_fn_weight)
        self.evaluator = None
        if cfg.eval_interval:
            if not len(self.eval_ds):
                print_rank0("warning: --eval_interval: the step-3 data has no eval split, so the evaluation uses "
                            "training prompts (not held out)")
            self.evaluator = PolicyEval(self.eval_ds if len(self.eval_ds) else self.train_ds, cfg, strategy, tok,
                                        Scorer(tok, self.reward_model), cfg.eval_fn)

    def _build_math(self) -> None:
        """KL controller, reward statistics, the losses and the sampling parameters."""
        cfg = self.cfg
        self.kl_ctl = (AdaptiveKLController(cfg.kl_ctl, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_ctl))
        self.reward_stats = RunningMoments()
        self.policy_loss = PolicyLoss(cfg.cliprange, cfg.entropy_coef, cfg.cliprange_high, cfg.loss_agg)
        self.value_loss = ValueLoss(cfg.cliprange_value)
        self.gen_params = px.GenerationParams(max_new_tokens=cfg.max_answer_seq_len, min_new_tokens=cfg.min_new_tokens,
                                              do_sample=cfg.temperature > 0, temperature=cfg.temperature or 1.0,
                                              top_p=cfg.top_p, top_k=cfg.top_k, num_return_sequences=cfg.group_size,
                                              hybrid=cfg.enable_hybrid_engine)

    @property
    def engines(self) -> dict:
        """The trained engines a checkpoint holds."""
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def _resume(self) -> Path | None:
        """--resume: engines, counters, KL controller, reward statistics and EMA from the latest checkpoint (None:
        a fresh run)."""
        resume_dir = resolve_resume(self.cfg)
        if resume_dir is None:
            return None
        st = self.state
        saved = self.strategy.load_state(self.engines, resume_dir)
        for f in dataclasses.fields(st):
            if f.name in saved:
                setattr(st, f.name, saved[f.name])
        st.trained_rounds = saved.get("trained_rounds", st.round)  # older checkpoints: every round
        self.kl_ctl.load_state_dict(saved["kl_ctl"])
        self.reward_stats.load_state_dict(saved["reward_stats"])
        if self.ema is not None and (resume_dir / "actor_ema.safetensors").exists():
            load_named_params(self.ema, self.strategy, resume_dir / "actor_ema.safetensors")
        print_rank0(f"resumed from {resume_dir} at step {st.round} (epoch {st.epoch}, "
                    f"prompt batch {st.batch_in_epoch})")
        return resume_dir

    def _open_logs(self) -> None:
        """Metrics writer (and TensorBoard), model sizes for the throughput figures, progress bar, the banner."""
        cfg = self.cfg
        tb_dir = (cfg.tensorboard_path or str(self.out_dir / "tensorboard")) if cfg.enable_tensorboard else None
        self.writer = MetricsWriter(self.out_dir, tb_dir)
        self.dims = (model_dims(self.actor), model_dims(self.critic) if self.critic is not None else None,
                     model_dims(self.reward_model) if self.reward_model is not None else None)
        self.bar = common.progress_bar(self.total_rounds, self.state.round, f"step3 {cfg.algo}", self.rank0)
        print_rank0(f"***** step 3 ({cfg.algo}): {len(self.train_ds)} prompts, {self.per_epoch} steps/epoch, "
                    f"{self.total_rounds} steps, {self.strategy.world_size} rank(s), dtype {self.strategy.cfg.dtype}, "
                    f"actor ZeRO-{cfg.actor_zero_stage}, "
                    + (f"critic ZeRO-{cfg.critic_zero_stage}" if cfg.algo == "ppo"
                       else f"reward model ZeRO-{3 if cfg.critic_zero_stage == 3 else 0}")
                    + " *****")


# ------------------------------------------------------------------------------------------------ loop helpers
def _new_timing() -> dict:
    """A step's time and token counts, for the throughput figures (reset after each logged step)."""
    return {"generation_s": 0.0, "inference_s": 0.0, "training_s": 0.0, "gen_tokens": 0, "rows": 0, "seq_tokens": 0,
            "dropped": 0}


def _add_rollout_timing(timing: dict, t: dict) -> None:
    """Add one rollout's timings (make_experience's) to the step's."""
    timing["generation_s"] += t["generation_s"]
    timing["inference_s"] += t["inference_s"]
    timing["gen_tokens"] += t["generated_tokens"]
    timing["rows"] += t["generated_rows"]
    timing["seq_tokens"] += t["seq_len"] * t["generated_rows"]
    timing["dropped"] += t["dropped"]  # answers with <= 1 real token (reported with the step line)


def _length_guard(state: RunState, cfg: PPOConfig, t: dict, strategy) -> str:
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
    state.length_streak = (state.length_streak + 1 if kind == state.length_kind else 1) if kind else 0
    state.length_kind = kind
    if not kind or state.length_streak < cfg.length_guard_steps:
        return ""
    what = (f"every answer had at most {cfg.length_guard_min_tokens} token(s)" if kind == "empty" else
            f"every answer ran to --max_answer_seq_len {cfg.max_answer_seq_len} without an end-of-text token")
    return (f"answer length collapsed: {what} in {state.length_streak} consecutive generation batches "
            "(--length_guard_steps; 0 turns this guard off)")


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
    s = torch.zeros(5)  # rows, sum of scores, of squared scores, of answer KLs (k1), of answer lengths
    for e in rows:
        mask = e.action_mask[:, e.start:]
        kl = ((e.logprobs - e.ref_logprobs)[:, e.start:] * mask).sum(1)
        s += torch.stack([torch.tensor(float(len(e))), e.reward_score.sum().cpu(), (e.reward_score ** 2).sum().cpu(),
                          kl.sum().cpu(), e.info["response_length"].sum().cpu()]).float()
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
    rows = max(1, timing["rows"])
    seq = max(1, int(timing["seq_tokens"] / rows))  # mean prompt + answer length actually processed
    k_a = (4 if cfg.actor_gradient_checkpointing else 3) - reused_forward
    gen_flops = flops_per_pass(*a_dims[1:], rows, seq, 1)
    infer_flops = 2 * flops_per_pass(*a_dims[1:], rows, seq, 1)  # actor + reference
    if r_dims is not None:  # no reward model with --reward_model_name_or_path none
        infer_flops += flops_per_pass(*r_dims[1:], rows, seq, 1)
    train_flops = cfg.ppo_epochs * flops_per_pass(*a_dims[1:], rows, seq, k_a)
    if c_dims is not None:
        k_c = (4 if cfg.critic_gradient_checkpointing else 3) - reused_forward
        infer_flops += flops_per_pass(*c_dims[1:], rows, seq, 1)
        train_flops += cfg.ppo_epochs * flops_per_pass(*c_dims[1:], rows, seq, k_c)
    gen_s, tr_s = max(timing["generation_s"], 1e-9), max(timing["training_s"], 1e-9)
    e2e = max(e2e, 1e-9)
    gen_tokens = max(1, timing["gen_tokens"])
    bytes_per = 4 if strategy.cfg.dtype == "fp32" else 2
    # every decode step reads all actor weights once
    bw = a_dims.n_params * bytes_per * gen_tokens / gen_s / 1e9
    global_rows = stats["n"]
    out = {"e2e_latency_s": e2e, "e2e_tflops": (gen_flops + infer_flops + train_flops) / e2e / 1e12,
           "samples_per_s": global_rows / e2e, "generation_latency_s": gen_s,
           "generation_per_token_latency_s": gen_s / gen_tokens, "generation_tflops": gen_flops / gen_s / 1e12,
           "generation_bw_gbs": bw, "inference_latency_s": timing["inference_s"], "training_latency_s": tr_s,
           "training_tflops": train_flops / tr_s / 1e12, "actor_params_b": a_dims.n_params / 1e9}
    out["_lines"] = (
        f"End-to-End => Latency: {e2e:.2f}s, TFLOPs: {out['e2e_tflops']:.4f}, Samples/sec: {out['samples_per_s']:.2f}, "
        f"Time/seq {e2e / max(global_rows, 1):.3f}s, Batch Size: {global_rows}, Total Seq. Length: {seq}\n"
        f"Generation => Latency: {gen_s:.2f}s, Per-token Latency {gen_s / gen_tokens * 1000:.2f} ms, TFLOPs: "
        f"{out['generation_tflops']:.4f}, BW: {bw:.2f} GB/sec, Answer Seq. Length: {gen_tokens}\n"
        f"Training   => Latency: {tr_s:.2f}s, TFLOPs: {out['training_tflops']:.4f} "
        f"(experience forward passes: {timing['inference_s']:.2f}s; figures are this rank's)")
    return out


def _all_reduce_max(strategy, x: float) -> float:
    t = torch.tensor([x], dtype=torch.float32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)
