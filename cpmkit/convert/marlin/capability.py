"""Which checkpoints CPM.cu's Marlin path runs: its C++ model is the dense MiniCPM decoder (fused q/k/v and
gate/up, silu, rope computed for default, llama3 or LongRoPE) with 4-bit g128 symmetric weights."""

from __future__ import annotations

from cpmkit.formats import marlin
from cpmkit.spec import Activation, Family, ModelSpec, RopeKind

CPMCU_ROPE = (RopeKind.DEFAULT, RopeKind.LONGROPE)


def marlin_reason(spec: ModelSpec) -> str | None:
    """Why CPM.cu would not run a Marlin artifact of ``spec`` (None: it would)."""
    if spec.family is not Family.MINICPM:
        return f"CPM.cu's Marlin model is MiniCPM's dense decoder; {spec.architecture} is not"
    if spec.moe is not None:
        return "CPM.cu has no MoE Marlin model"
    if spec.activation is not Activation.SILU:
        return f"CPM.cu's fused gate_up runs silu, not {spec.activation.value}"
    if spec.rope.kind not in CPMCU_ROPE:
        return f"CPM.cu computes rope for default and LongRoPE scaling, not {spec.rope.kind.value}"
    shapes = spec.tensor_shapes()
    for name, (n, k) in ((n, s) for n, s in shapes.items() if n.startswith("model.layers.0.") and len(s) == 2):
        if k % marlin.GROUP_SIZE or n % marlin.TILE_N:
            return (f"{name.removeprefix('model.layers.0.')} is {n}x{k}: Marlin needs input features divisible "
                    f"by {marlin.GROUP_SIZE} and output features by {marlin.TILE_N}")
    return None
