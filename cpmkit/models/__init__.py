"""Reference torch forwards of every MiniCPM family, one module per family, each exporting ``Model``.

``build_model(spec)`` returns an empty (meta-device) ``CausalLM``; fill it with ``load_weights``.
"""

from __future__ import annotations

from types import ModuleType

import torch

from cpmkit.errors import CpmkitError
from cpmkit.models import llama, minicpm, minicpm3
from cpmkit.models.causal_lm import CausalLM
from cpmkit.models.layers import KVCache, LinearFactory
from cpmkit.spec import Family, ModelSpec

FAMILY_MODULES: dict[Family, ModuleType] = {
    Family.MINICPM: minicpm,
    Family.MINICPM3: minicpm3,
    Family.LLAMA: llama,
}


def build_model(spec: ModelSpec, *, linear_factory: LinearFactory | None = None,
                dtype: torch.dtype = torch.float32, weight_dtype: torch.dtype | None = None) -> CausalLM:
    """The family's reference model for ``spec`` on the meta device, running in ``dtype`` with its float
    weights kept in ``weight_dtype`` (default: ``dtype``); every linear comes from
    ``linear_factory(hf_name, in_features, out_features)`` (default: ``StoredLinear``, no bias)."""
    module = FAMILY_MODULES.get(spec.family)
    if module is None:
        raise CpmkitError(f"{spec.architecture}: no reference model for family {spec.family.value!r}; "
                          f"supported: {', '.join(f.value for f in FAMILY_MODULES)}")
    return module.Model(spec, linear_factory=linear_factory, dtype=dtype, weight_dtype=weight_dtype)


__all__ = ["CausalLM", "FAMILY_MODULES", "KVCache", "LinearFactory", "build_model"]
