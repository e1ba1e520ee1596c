"""Which checkpoints mlx-lm 0.32 runs correctly from an MLX folder (models/minicpm.py, minicpm3.py, llama.py and
rope_utils.py), and why not where it cannot."""

from __future__ import annotations

from cpmkit.spec import Activation, Family, ModelSpec, RopeKind


def mlx_reason(spec: ModelSpec) -> str | None:
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
