"""Which artifact formats a checkpoint can become, and why not where it cannot.

Each target registers a check: given the spec and the ternary scan, it returns None when the conversion
is possible, or one sentence saying what would go wrong in the runtime that reads the artifact.
"""

from __future__ import annotations

from typing import Callable

from cpmkit.quant.ternary import TernaryGranularity
from cpmkit.spec import Activation, Family, ModelSpec, RopeKind

Check = Callable[[ModelSpec, "TernaryGranularity | None"], "str | None"]
TARGETS: dict[str, Check] = {}

# llama.cpp's minicpm3 graph (src/models/minicpm3.cpp) ignores the config and uses these
LLAMA_CPP_MINICPM3_MUP = (12.0, 1.4, 256.0)


def target(name: str):
    def register(check: Check) -> Check:
        TARGETS[name] = check
        return check

    return register


@target("gguf")
def _gguf(spec: ModelSpec, ternary: TernaryGranularity | None) -> str | None:
    if spec.activation is Activation.FATRELU:
        return "llama.cpp's minicpm graph hard-codes SiLU; a fatrelu (MiniCPM-S) model would run wrong"
    if spec.family is Family.MINICPM3 and spec.mup is not None:
        scales = (spec.mup.scale_emb, spec.mup.scale_depth, spec.mup.dim_model_base)
        if scales != LLAMA_CPP_MINICPM3_MUP:
            return (f"llama.cpp hard-codes scale_emb/scale_depth/dim_model_base = 12/1.4/256 for minicpm3; "
                    f"this checkpoint has {scales[0]:g}/{scales[1]:g}/{scales[2]:g}")
    return None


@target("gguf-ternary")
def _gguf_ternary(spec: ModelSpec, ternary: TernaryGranularity | None) -> str | None:
    return _gguf(spec, ternary) or ternary_block_reason(ternary)


def ternary_block_reason(ternary: TernaryGranularity | None) -> str | None:
    """Why weights of this ternary granularity (None: not ternary) do not fit TQ1_0/TQ2_0 exactly."""
    if ternary is None:
        return "TQ1_0/TQ2_0 are lossless only for ternary weights; this checkpoint's linears are not ternary"
    if ternary.group_size is not None and ternary.group_size < 256:
        return (f"ternary scales vary every {ternary.group_size} weights, but TQ1_0/TQ2_0 hold one scale per 256: "
                "lossy (use Q8_0 instead)")
    return None


@target("mlx")
def _mlx(spec: ModelSpec, ternary: TernaryGranularity | None) -> str | None:
    # mlx-lm 0.32.2 models/minicpm.py, minicpm3.py and rope_utils.py
    rope = spec.rope
    if spec.activation is Activation.FATRELU:
        return "mlx-lm's minicpm model is SiLU-only; a fatrelu (MiniCPM-S) model would run wrong"
    if spec.moe is not None:
        return "mlx-lm's minicpm model has no mixture-of-experts layers"
    if spec.family is Family.MINICPM3 and rope.kind not in (RopeKind.DEFAULT, RopeKind.LONGROPE):
        return f"mlx-lm's minicpm3 model always runs LongRoPE; {rope.kind.value} rope_scaling would run wrong"
    if rope.kind is RopeKind.LONGROPE and rope.short_factor != rope.long_factor:
        return ("mlx-lm's LongRoPE always uses long_factor, and this checkpoint's short_factor differs: sequences "
                f"up to original_max_position_embeddings ({rope.original_max_position}) would run wrong")
    return None


def check_targets(spec: ModelSpec, ternary: TernaryGranularity | None) -> dict[str, str | None]:
    return {name: check(spec, ternary) for name, check in TARGETS.items()}
