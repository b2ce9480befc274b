"""Multi-head low-rank adapters: one fused layer (`layer.py`), four method presets
(`methods.py`), and injection/merging (`inject.py`). Imports only torch."""

from .inject import (
                     adapter_layers,
                     adapter_state,
                     find_targets,
                     inject_adapters,
                     merge_adapters,
                     parameter_counts,
)
from .layer import PREFIX, LayerSpec, MultiHeadLoRA
from .methods import METHODS, ROUTER_METHODS, AdapterConfig, layer_spec

__all__ = [
    "AdapterConfig", "LayerSpec", "METHODS", "MultiHeadLoRA", "PREFIX", "ROUTER_METHODS",
    "adapter_layers", "adapter_state", "find_targets", "inject_adapters", "layer_spec",
    "merge_adapters", "parameter_counts",
]
