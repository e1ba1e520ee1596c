"""Which checkpoints llama.cpp runs correctly from a GGUF file, and why not where it cannot."""

from __future__ import annotations

from cpmkit.quant.ternary import TernaryGranularity
from cpmkit.spec import Activation, Family, ModelSpec

# llama.cpp's minicpm3 graph (src/models/minicpm3.cpp) ignores the config and uses these
LLAMA_CPP_MINICPM3_MUP = (12.0, 1.4, 256.0)
TERNARY_BLOCK = 256  # weights per TQ1_0 / TQ2_0 block, all under one scale


def gguf_reason(spec: ModelSpec) -> str | None:
    """Why llama.cpp would run a GGUF file of ``spec`` wrongly (None: it runs it as the checkpoint's code)."""
    if spec.activation is Activation.FATRELU:
        return "llama.cpp's minicpm graph hard-codes SiLU; a fatrelu (MiniCPM-S) model would run wrong"
    if spec.family is Family.MINICPM3 and spec.mup is not None:
        scales = (spec.mup.scale_emb, spec.mup.scale_depth, spec.mup.dim_model_base)
        if scales != LLAMA_CPP_MINICPM3_MUP:
            return (f"llama.cpp hard-codes scale_emb/scale_depth/dim_model_base = 12/1.4/256 for minicpm3; "
                    f"this checkpoint has {scales[0]:g}/{scales[1]:g}/{scales[2]:g}")
    return None


def ternary_block_reason(ternary: TernaryGranularity | None) -> str | None:
    """Why weights of this ternary granularity (None: not ternary) do not fit TQ1_0/TQ2_0 exactly."""
    if ternary is None:
        return "TQ1_0/TQ2_0 are lossless only for ternary weights; this checkpoint's linears are not ternary"
    if ternary.group_size is not None and ternary.group_size < TERNARY_BLOCK:
        return (f"ternary scales vary every {ternary.group_size} weights, but TQ1_0/TQ2_0 hold one scale per "
                f"{TERNARY_BLOCK}: lossy (use Q8_0 instead)")
    return None
