"""Reward model (and PPO critic): a causal-LM body (``AutoModel``, any family) + a scalar value head.

Saved as a Hugging Face dir that needs no custom code to inspect: config.json is the body's config with
``architectures`` naming the body class and a ``chatrlhf_reward`` block; weights are safetensors (sharded when large)
holding the body's own keys plus ``v_head.weight``. ``load_reward_model`` reads that back offline, and also turns a
plain causal-LM dir into a fresh reward model (value head initialised) for step 2. The original's critic loader
demanded pytorch_model.bin (problem 13): nothing here reads pickles. A custom family (its code in the folder, named
by config.json's ``auto_map``) loads only with ``trust_remote_code``; its .py files are copied into every reward
model saved from it, so the checkpoint loads on its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from chatrlhf.algo.losses import end_positions, gather_end
from chatrlhf.errors import ModelError
from chatrlhf.models.loading import (REWARD_KEY, _from_pretrained, apply_dropout, check_model_files, copy_model_code,
                                     remote_code_refs)
from chatrlhf.models.registry import resolve_model_path


def _value_dim(config) -> int:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    # OPT-350m projects hidden states down to word_embed_proj_dim before returning them.
    for k in ("word_embed_proj_dim", "hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ModelError(f"cannot tell the hidden size of model type {getattr(cfg, 'model_type', '?')!r}")


class RewardModel(nn.Module):
    """``forward(input_ids, attention_mask) -> values [B, L]`` (one scalar per token); ``end_scores`` picks the
    value at each row's last real token (the reward/critic score). ``num_padding_at_beginning`` is kept for
    DeepSpeed-Chat compatibility (OPT's leading BOS == pad) when no attention mask is given."""

    def __init__(self, body: nn.Module, num_padding_at_beginning: int = 0, pad_token_id: int | None = None):
        super().__init__()
        self.config = body.config
        self.rwtransformer = body
        self.v_head = nn.Linear(_value_dim(body.config), 1, bias=False)
        self.num_padding_at_beginning = num_padding_at_beginning
        self.pad_token_id = pad_token_id if pad_token_id is not None else getattr(body.config, "pad_token_id", None)
        self.code_dir: Path | None = None  # a custom family's folder: its .py files go with every save

    def gradient_checkpointing_enable(self, **kw):
        self.rwtransformer.gradient_checkpointing_enable(**kw)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False) -> torch.Tensor:
        out = self.rwtransformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)
        hidden = out[0]
        return self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)

    def end_scores(self, values: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ends = end_positions(input_ids, attention_mask, self.pad_token_id, self.num_padding_at_beginning)
        return gather_end(values, ends)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.end_scores(self.forward(input_ids, attention_mask), input_ids, attention_mask)

    # ---- save ---------------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: dict | None = None,
                        max_shard_size: str | int = "2GB") -> None:
        """Body keys as the body class names them + ``v_head.weight``; config marks it as a reward model."""
        out = Path(out_dir)
        sd = state_dict if state_dict is not None else {k: v.detach().cpu() for k, v in self.state_dict().items()}
        body_sd = {k[len("rwtransformer."):]: v for k, v in sd.items() if k.startswith("rwtransformer.")}
        body_sd["v_head.weight"] = sd["v_head.weight"]
        self.rwtransformer.save_pretrained(out, state_dict=body_sd, max_shard_size=max_shard_size)
        cfg = json.loads((out / "config.json").read_text())
        cfg["architectures"] = [type(self.rwtransformer).__name__]
        cfg[REWARD_KEY] = {"base_model_type": self.config.model_type,
                           "num_padding_at_beginning": self.num_padding_at_beginning,
                           "value_head": "v_head.weight", "value_dim": self.v_head.in_features}
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if self.code_dir is not None:
            # transformers copies a body's code only when it was loaded through its own auto_map entry

            copy_model_code(self.code_dir, out)


def is_reward_dir(path: str | os.PathLike) -> bool:
    p = Path(path) / "config.json"
    try:
        return REWARD_KEY in json.loads(p.read_text())
    except (OSError, ValueError):
        return False


def _read_v_head(path: Path) -> torch.Tensor | None:
    from safetensors import safe_open  # lazy: safetensors

    files = [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text()).get("weight_map", {})
        files = [path / wm["v_head.weight"]] if "v_head.weight" in wm else []
    for f in files:
        if f.exists():
            with safe_open(str(f), framework="pt") as h:
                if "v_head.weight" in h.keys():
                    return h.get_tensor("v_head.weight")
    return None


def load_reward_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
                      num_padding_at_beginning: int | None = None, dropout: float | None = None,
                      pad_token_id: int | None = None, require_value_head: bool = False,
                      trust_remote_code: bool = False) -> RewardModel:
    """A saved reward model (value head restored) or a causal-LM dir (fresh value head; ModelError instead with
    ``require_value_head``, e.g. for PPO's critic and reward model). Local safetensors files only. A custom family
    needs ``trust_remote_code`` (ModelError naming --trust_remote_code otherwise); when its auto_map registers
    only a causal LM (GPT-Pangu's), the body is that LM's base model.

    Call inside ``strategy.zero3_init_context()`` to build a ZeRO-3-partitioned body."""
    from transformers import AutoModel, AutoModelForCausalLM  # lazy: transformers

    p = Path(resolve_model_path(str(path)))  # a model name or GGUF: its converted folder
    if not (p / "config.json").is_file():
        raise ModelError(f"{p}: not a model directory (no config.json)")
    # no pickles, complete safetensors, a readable config; the folder's own code refused unless trusted
    config = check_model_files(p, trust_remote_code=trust_remote_code)
    remote = remote_code_refs(p) if trust_remote_code else {}
    if dropout is not None:
        apply_dropout(config, dropout)
    meta = json.loads((p / "config.json").read_text()).get(REWARD_KEY)
    if require_value_head and not meta:
        raise ModelError(f"{p}: not a trained reward model (its config.json has no {REWARD_KEY!r} block, so its value "
                         "head would be random); pass the output dir of `chatrlhf reward`")
    kw = {"dtype": dtype} if dtype is not None else {}
    from transformers.utils import logging as hf_logging  # lazy: transformers

    level = hf_logging.get_verbosity()
    body_from_lm = bool(remote) and "AutoModel" not in remote and "AutoModelForCausalLM" in remote
    if meta or body_from_lm:
        # v_head.weight is read below, and a discarded lm_head is not a missing weight: that report is noise
        hf_logging.set_verbosity_error()
    try:
        if body_from_lm:
            lm = _from_pretrained(AutoModelForCausalLM, p, config, kw.get("dtype"), True, "a causal LM")
            body = lm.base_model
            if body is lm:
                raise ModelError(f"{p}: cannot find the body of {type(lm).__name__} (no base_model_prefix) and its "
                                 "auto_map has no AutoModel entry; add one naming the body class")
        else:
            # The saved config names the body class (e.g. OPTModel) or a causal LM; AutoModel picks the body either
            # way (for a custom family through its auto_map's AutoModel entry).
            body = _from_pretrained(AutoModel, p, config, kw.get("dtype"), trust_remote_code, "a model body")
    finally:
        hf_logging.set_verbosity(level)
    npb = num_padding_at_beginning
    if npb is None:
        npb = int(meta.get("num_padding_at_beginning", 0)) if meta else 0
    rm = RewardModel(body, num_padding_at_beginning=npb, pad_token_id=pad_token_id)
    if remote:
        rm.code_dir = p
    if meta:
        w = _read_v_head(p)
        if w is None:
            raise ModelError(f"{p}: reward model without a value head (v_head.weight missing)")
        if any(hasattr(q, "ds_id") for q in body.parameters()):
            rm.v_head.weight.data = w.to(rm.v_head.weight.dtype).view_as(rm.v_head.weight.data)
        else:
            rm.v_head.weight.data.copy_(w.view_as(rm.v_head.weight))
    else:
        # Small init keeps initial scores near 0 so the first losses are ~log 2.
        nn.init.normal_(rm.v_head.weight, std=1.0 / (rm.v_head.in_features + 1) ** 0.5)
    if dtype is not None:
        rm.v_head.to(dtype)
    return rm
