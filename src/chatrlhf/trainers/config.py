"""The flags every training step shares (TrainConfig, named as DeepSpeed-Chat names them) and the config of a step
that trains one model on its phase's data (StepConfig: sft, reward, dpo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from chatrlhf.config import check_fields, check_output_dir
from chatrlhf.config import option as _h
from chatrlhf.data.phases import DataConfig
from chatrlhf.errors import UserError
from chatrlhf.models.loading import preflight_model
from chatrlhf.models.registry import resolve_model_path

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    model_name_or_path: str = _h("Local Hugging Face model dir (or hub name when online) to start from.", "")
    output_dir: str = _h("Where the final checkpoint, metrics.jsonl, checkpoints/ and done.json go.", "output")
    per_device_train_batch_size: int = _h("Micro-batch size per device (rank) for training.", 16, ge=1)
    per_device_eval_batch_size: int = _h("Batch size per device for evaluation.", 16, ge=1)
    learning_rate: float = _h("Initial learning rate (after warmup).", 1e-3, gt=0)
    weight_decay: float = _h("AdamW weight decay (never applied to biases and norm weights).", 0.0, ge=0)
    num_train_epochs: int = _h("Passes over the training data.", 1, ge=1)
    max_steps: int = _h("Stop after this many optimizer steps (-1: run num_train_epochs). Sets the schedule "
                        "length when > 0.", -1, ge=1, special=(-1,))
    gradient_accumulation_steps: int = _h("Micro-batches per optimizer step.", 1, ge=1)
    lr_scheduler_type: str = _h(f"Learning-rate schedule: {', '.join(SCHEDULERS)}.", "cosine", choices=SCHEDULERS)
    num_warmup_steps: int = _h("Warmup steps of the schedule.", 0, ge=0)
    seed: int = _h("Random seed (model init, dropout, data order).", 1234, ge=0, le=2**32 - 1)
    gradient_checkpointing: bool = _h("Recompute activations in backward to save memory (~1/3 more compute).",
                                      False)
    use_liger_kernel: bool = _h("Liger-Kernel's Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear + cross-entropy) "
                                "for the model's type: GPUs only, needs the liger-kernel package.", False)
    dropout: Optional[float] = _h("Set every dropout probability of the model to this value.", None, ge=0, lt=1)
    disable_dropout: bool = _h("Set every dropout probability to 0 (deterministic training).", False)
    offload: bool = _h("ZeRO-Offload: optimizer states (and ZeRO-3 weights) in host memory, updated by DeepSpeed's "
                       "CPU Adam (its op is compiled on first use, 1-2 min). Needs ZeRO stage 1-3 (ZeRO-0 has no "
                       "partitioned state to offload: refused). On a CPU-only machine it saves no memory.", False)
    dtype: str = _h("Training dtype: auto, fp32, bf16, fp16. auto = bf16 where the device does bf16 natively "
                    "(GPUs with bf16, CPUs with AVX512-BF16/AMX), else fp32 on CPU / fp16 on old GPUs. fp16 is "
                    "refused on CPU.", "auto", choices=DTYPE_CHOICES)
    zero_stage: int = _h("DeepSpeed ZeRO stage 0-3 (3 partitions weights too).", 0, choices=(0, 1, 2, 3))
    lora_dim: int = _h("LoRA rank; 0 disables LoRA.", 0, ge=0)
    lora_module_name: str = _h("Comma-separated module names, suffixes or substrings to put LoRA on (e.g. "
                               "q_proj,v_proj or decoder.layers.). auto = every Linear/Conv1D except lm_head.",
                               "auto")
    only_optimize_lora: bool = _h("Train only the LoRA weights (base weights frozen).", False)
    lora_learning_rate: float = _h("Learning rate of the LoRA parameters.", 5e-4, gt=0)
    save_lora_adapter: bool = _h("Also write the LoRA adapter (peft layout) to OUTPUT/lora_adapter; the main "
                                 "checkpoint always has LoRA merged.", False)
    compute_fp32_loss: bool = _h("Compute the loss from fp32 logits (stabler under bf16/fp16).", False)
    enable_tensorboard: bool = _h("Write TensorBoard scalars.", False)
    tensorboard_path: str = _h("TensorBoard dir (default OUTPUT/tensorboard).", "")
    print_loss: bool = _h("Print the loss of every step on rank 0.", False)
    eval_interval: int = _h("Evaluate every N optimizer steps (0: only before training and after each epoch).", 0,
                            ge=0)
    eval_iters: int = _h("Evaluation batches per evaluation (0: the whole eval split).", 0, ge=0)
    save_interval: int = _h("Write a checkpoint (HF model + resumable state) every N steps (0: only at the end).",
                            0, ge=0)
    keep_last_checkpoints: int = _h("Resumable checkpoints kept under OUTPUT/checkpoints (0: keep all).", 2, ge=0)
    resume: str = _h("auto: continue from the latest checkpoint in OUTPUT/checkpoints if any, refused when it was "
                     "trained with other settings or data (each checkpoint records them); never: start fresh; "
                     "force: like auto, but continue even when settings or data differ (listed as a warning); or a "
                     "path to a checkpoints/step_N dir (force:PATH to skip the check there). A resumed run may "
                     "change --max_steps/--num_train_epochs (a non-constant schedule then follows the new length) "
                     "and flags that do not change the math (output, logging, eval and save intervals, offload, "
                     "gradient checkpointing).", "auto")
    add_eot_token: bool = _h("Add --eot_token as a special token, use it as end-of-text (resizes embeddings).",
                             False)
    eot_token: str = _h("The end-of-text token for --add_eot_token.", "<|endoftext|>")
    local_rank: int = _h("Set by the deepspeed launcher; leave at -1.", -1, ge=-1)
    log_interval: int = _h("Log train metrics and the throughput line every N steps (0: no throughput lines).", 10,
                           ge=0)
    gradient_clipping: float = _h("Clip the global gradient norm to this value (0: no clipping).", 1.0, ge=0)
    skip_memory_check: bool = _h("Skip the out-of-memory preflight estimate.", False)
    trust_remote_code: bool = _h("Run the Python code in the model folder: needed for a custom model family whose "
                                 "config.json auto_map names classes in the folder's modeling_*.py / "
                                 "configuration_*.py. That code runs with your permissions: only for folders you "
                                 "trust. Off: such a folder is refused.", False)

    def validate_train(self) -> None:
        """Every field's type and rule (declared with the field), then what spans fields or touches the disk."""
        check_fields(self)
        if not self.model_name_or_path:
            raise UserError("--model_name_or_path is required")

        self.model_name_or_path = resolve_model_path(self.model_name_or_path, "--model_name_or_path")
        if self.add_eot_token and not self.eot_token:
            raise UserError("--add_eot_token needs a non-empty --eot_token")
        check_output_dir(self.output_dir, "--output_dir")
        if self.enable_tensorboard and self.tensorboard_path:
            check_output_dir(self.tensorboard_path, "--tensorboard_path")


@dataclass
class StepConfig(DataConfig, TrainConfig):
    """A step that trains one model on its phase's data (sft, reward, dpo): the data and training checks, then the
    model's preflight."""

    def validate(self) -> None:
        DataConfig.validate(self)
        self.validate_train()

    def preflight(self) -> None:
        """Model checks before anything is built or written (run by ``main``): files, tokenizer, positions."""
        preflight_model(self.model_name_or_path, "--model_name_or_path", self.max_seq_len,
                        trust_remote_code=self.trust_remote_code)
