"""Data layer: dataset adapters, sources, phase datasets with an on-disk cache, collators, chat templates.

See docs/ARCHITECTURE.md ("Phase data") for the contract. The names below are re-exported lazily (PEP 562), so
``chatrlhf.data.template`` or ``.adapters`` can be imported without torch.
"""

import importlib

_EXPORTS = {
    "ADAPTERS": "adapters", "Row": "adapters", "format_prompt": "adapters",
    **{n: "phases" for n in ("DataConfig", "PairCollator", "PhaseDataset", "PromptCollator", "SFTCollator",
                             "build_phase_datasets", "parse_data_split", "plan_phase_rows")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
