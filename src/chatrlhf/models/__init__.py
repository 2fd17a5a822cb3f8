"""Models: offline-safe loading and checks, tiny random models for the embedded default.

Importing this package does not import torch or transformers; the functions do, when called.
"""

from chatrlhf.models.loading import (apply_dropout, check_seq_len, check_tokenizers_compatible, is_model_dir,
                                     load_causal_lm, load_tokenizer, max_positions, num_padding_at_beginning)
from chatrlhf.models.tiny import FAMILIES, build_tiny_model, train_tokenizer

__all__ = [
    "FAMILIES", "apply_dropout", "build_tiny_model", "check_seq_len", "check_tokenizers_compatible", "is_model_dir",
    "load_causal_lm", "load_tokenizer", "max_positions", "num_padding_at_beginning", "train_tokenizer",
]
