"""Data layer: dataset adapters, sources, phase datasets with an on-disk cache, collators.

See docs/ARCHITECTURE.md ("Phase data") for the contract.
"""

from chatrlhf.data.adapters import ADAPTERS, Row, format_prompt
from chatrlhf.data.phases import (DataConfig, PairCollator, PhaseDataset, PromptCollator, SFTCollator,
                                  build_phase_datasets, parse_data_split, plan_phase_rows)

__all__ = [
    "ADAPTERS", "DataConfig", "PairCollator", "PhaseDataset", "PromptCollator", "Row", "SFTCollator",
    "build_phase_datasets", "format_prompt", "parse_data_split", "plan_phase_rows",
]
