"""``cpmkit inspect``: what a checkpoint is, as one JSON-able dict."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Callable, Iterable

from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.registry import FORMATS
from cpmkit.quant.ternary import TernaryGranularity, coarsest_common, detect_ternary
from cpmkit.tokenizer import Tokenizer

Progress = Callable[[Iterable], Iterable]


def linear_weight_names(ck: Checkpoint) -> list[str]:
    """The transformer blocks' linear weights: what quantizers and the ternary scan look at (the MoE
    router stays out, like in every runtime)."""
    return [n for n, shape in ck.spec.tensor_shapes().items()
            if len(shape) == 2 and n.startswith("model.layers.") and not n.endswith("mlp.gate.weight")]


def scan_weights(ck: Checkpoint, progress: Progress = iter) -> dict[str, Any]:
    """Stream every tensor (each is checked to be finite as it is read) and test the linears for
    ternary values: ternary when all are, at the granularity they all satisfy."""
    linear = set(linear_weight_names(ck))
    reports, first_non_ternary = [], None
    for name, tensor in progress(ck.stream()):
        if name in linear and first_non_ternary is None:
            report = detect_ternary(tensor)
            if report is None:
                first_non_ternary = name
            reports.append(report)
    if first_non_ternary is not None:
        return {"ternary": False, "granularity": None, "zero_fraction": None, "first_non_ternary": first_non_ternary}
    zero = sum(r.zero_fraction for r in reports) / max(len(reports), 1)
    return {"ternary": True, "granularity": coarsest_common(reports).value, "zero_fraction": round(zero, 4),
            "first_non_ternary": None}


def describe(ck: Checkpoint, *, scan: bool = True, progress: Progress = iter) -> dict[str, Any]:
    spec = ck.spec
    ternary = scan_weights(ck, progress) if scan else None
    granularity = TernaryGranularity(ternary["granularity"]) if ternary and ternary["ternary"] else None
    targets = {kind: reason for plugin in FORMATS.values()
               for kind, reason in plugin.capabilities(spec, granularity).items()}
    tok = Tokenizer(ck.root, ck.config)
    rope = dataclasses.asdict(spec.rope)
    rope["kind"] = spec.rope.kind.value
    rope["attention_factor"] = spec.rope.attention_factor
    return {
        "path": str(ck.root),
        "family": spec.family.value,
        "architecture": spec.architecture,
        "parameters": spec.parameter_count(),
        "dtypes": dict(Counter(str(r.dtype).removeprefix("torch.") for r in ck.tensors.values())),
        "tied_head": spec.tie_word_embeddings,
        "layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "heads": spec.num_heads,
        "kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "rms_norm_eps": spec.rms_norm_eps,
        "activation": spec.activation.value,
        "activation_threshold": spec.activation_threshold,
        "rope": rope,
        "mup": None if spec.mup is None else {
            "scale_emb": spec.mup.scale_emb, "scale_depth": spec.mup.scale_depth,
            "dim_model_base": spec.mup.dim_model_base,
            "residual_scale": spec.mup.residual_scale(spec.num_layers),
            "logit_divisor": spec.mup.logit_divisor(spec.hidden_size)},
        "moe": None if spec.moe is None else dataclasses.asdict(spec.moe),
        "mla": None if spec.mla is None else dataclasses.asdict(spec.mla),
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "bos_id": tok.special.bos_id,
                      "eos_ids": list(tok.special.eos_ids), "add_bos": tok.special.add_bos,
                      "chat_template": tok.chat_template is not None},
        "ternary": ternary,
        "targets": {name: {"possible": reason is None, "reason": reason} for name, reason in targets.items()},
        "weight_files": [f.name for f in ck.weight_files],
        "dropped_tensors": ck.dropped,
        "notes": list(spec.notes),
    }


def format_text(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe`'s dict."""
    rope = info["rope"]
    rope_text = f"{rope['kind']}, theta {rope['theta']:g}, {rope['dim']} dims, max position {rope['max_position']}"
    if rope["kind"] == "longrope":
        rope_text += (f", original {rope['original_max_position']}, attention factor "
                      f"{rope['attention_factor']:.4f}")
    lines = [
        f"{info['path']}",
        f"  family        {info['family']} ({info['architecture']})",
        f"  parameters    {info['parameters']:,} ({', '.join(f'{k}: {v}' for k, v in info['dtypes'].items())} tensors)",
        f"  shape         {info['layers']} layers, hidden {info['hidden_size']}, ffn {info['intermediate_size']}, "
        f"heads {info['heads']}/{info['kv_heads']} x {info['head_dim']}, vocab {info['vocab_size']}",
        f"  head          {'tied to the embedding' if info['tied_head'] else 'separate lm_head'}",
        f"  activation    {info['activation']}"
        + (f" (threshold {info['activation_threshold']:g})" if info["activation"] == "fatrelu" else ""),
        f"  rope          {rope_text}",
    ]
    if info["mup"]:
        m = info["mup"]
        lines.append(f"  muP           scale_emb {m['scale_emb']:g}, residual x{m['residual_scale']:.6f}, "
                     f"logits / {m['logit_divisor']:g}")
    if info["moe"]:
        lines.append(f"  experts       {info['moe']['num_experts']} (top {info['moe']['top_k']})")
    if info["mla"]:
        m = info["mla"]
        lines.append(f"  MLA           q_lora {m['q_lora_rank']}, kv_lora {m['kv_lora_rank']}, "
                     f"qk {m['qk_nope_head_dim']}+{m['qk_rope_head_dim']}, v {m['v_head_dim']}")
    t = info["ternary"]
    if t is None:
        lines.append("  ternary       not scanned")
    elif t["ternary"]:
        lines.append(f"  ternary       yes: scales per {t['granularity']}, {t['zero_fraction']:.1%} zeros")
    else:
        lines.append(f"  ternary       no (first non-ternary weight: {t['first_non_ternary']})")
    tok = info["tokenizer"]
    lines.append(f"  tokenizer     {tok['kind']}, {tok['vocab_size']} tokens, bos {tok['bos_id']}, "
                 f"eos {tok['eos_ids']}, chat template {'yes' if tok['chat_template'] else 'no'}")
    lines.append("  targets")
    for name, target in info["targets"].items():
        lines.append(f"    {name:<13} {'yes' if target['possible'] else 'no: ' + target['reason']}")
    lines += [f"  note          {n}" for n in info["notes"]]
    return "\n".join(lines)
