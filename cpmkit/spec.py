"""What a checkpoint's config.json says, read into one typed, validated ``ModelSpec``.

Each family registers how its config is read (the defaults of its own reference code where a key is
absent: MiniCPM-2B's file has no ``rope_theta`` or ``tie_word_embeddings``) and which tensors, of which
shapes, its checkpoints hold. Facts: ../shared/minicpm/ARCHITECTURES.md §0-§3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from cpmkit.errors import CpmkitError


class Family(str, Enum):
    MINICPM = "minicpm"  # MiniCPMForCausalLM: 1B/2B/2B-128k, 4/4.1, S (fatrelu), MoE-8x2B, BitCPM4
    MINICPM3 = "minicpm3"  # MiniCPM3ForCausalLM: MLA attention
    LLAMA = "llama"  # LlamaForCausalLM: MiniCPM5


class Activation(str, Enum):
    SILU = "silu"
    FATRELU = "fatrelu"  # MiniCPM-S: gate kept where gate > threshold, else 0


class RopeKind(str, Enum):
    DEFAULT = "default"
    LINEAR = "linear"
    DYNAMIC = "dynamic"  # dynamic NTK (MiniCPM-2B-128k)
    LONGROPE = "longrope"  # MiniCPM3, MiniCPM4/4.1 ("su" is its old name)


@dataclass(frozen=True)
class RopeSpec:
    kind: RopeKind
    theta: float
    dim: int  # rotated dimensions per head
    max_position: int
    factor: float = 1.0  # linear / dynamic
    original_max_position: int | None = None  # longrope
    long_factor: tuple[float, ...] | None = None
    short_factor: tuple[float, ...] | None = None

    @property
    def attention_factor(self) -> float:
        """LongRoPE's cos/sin multiplier. The remote code does not clamp it at 1 when max_position is below
        the original; transformers does, and so do we (it is 1 for every released config)."""
        if self.kind is not RopeKind.LONGROPE:
            return 1.0
        ratio = self.max_position / self.original_max_position
        if ratio <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(ratio) / math.log(self.original_max_position))


@dataclass(frozen=True)
class MupSpec:
    """MiniCPM's muP scalings, applied at run time by the reference code."""

    scale_emb: float
    scale_depth: float
    dim_model_base: float

    def residual_scale(self, num_layers: int) -> float:
        return self.scale_depth / math.sqrt(num_layers)

    def logit_divisor(self, hidden_size: int) -> float:
        return hidden_size / self.dim_model_base


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int  # softmax over all experts, top-k kept and renormalised to sum to 1


@dataclass(frozen=True)
class MLASpec:
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    latent_norm_eps: float = 1e-6  # q_a/kv_a layernorms use the constructor default, not rms_norm_eps

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelSpec:
    family: Family
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: RopeSpec
    activation: Activation = Activation.SILU
    activation_threshold: float = 0.0
    mup: MupSpec | None = None
    moe: MoESpec | None = None
    mla: MLASpec | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    notes: tuple[str, ...] = field(default=())  # config features read but deliberately not run

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint of this spec holds, with its shape (lm_head only when untied)."""
        return _FAMILIES[self.family].tensor_shapes(self)

    def parameter_count(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())


# Keys a checkpoint may hold that carry no weights (old .bin files keep rotary caches).
DROPPED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

UNSUPPORTED_ARCHITECTURES = {
    "MiniCPMSALAForCausalLM": "MiniCPM-SALA's lightning/sparse hybrid attention has no reference here yet",
}


@dataclass(frozen=True)
class _FamilyRules:
    required: tuple[str, ...]
    build: Callable[[dict[str, Any], str], ModelSpec]
    tensor_shapes: Callable[[ModelSpec], dict[str, tuple[int, ...]]]


ARCHITECTURES: dict[str, Family] = {
    "MiniCPMForCausalLM": Family.MINICPM,
    "MiniCPM3ForCausalLM": Family.MINICPM3,
    "LlamaForCausalLM": Family.LLAMA,
}
_MODEL_TYPES = {"minicpm": Family.MINICPM, "minicpm4": Family.MINICPM, "minicpm3": Family.MINICPM3,
                "llama": Family.LLAMA}

_BASE_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def read_spec(config: dict[str, Any], source: str = "config.json") -> ModelSpec:
    """Read a config dict into a ModelSpec; ``source`` names the file in error messages."""
    family, architecture = detect_family(config, source)
    rules = _FAMILIES[family]
    missing = [k for k in rules.required if k not in config]
    if missing:
        raise CpmkitError(f"{source}: missing required key {missing[0]!r} for {architecture}")
    try:
        spec = rules.build(config, architecture)
    except (TypeError, ValueError, KeyError) as e:
        raise CpmkitError(f"{source}: invalid value for {architecture}: {e}") from None
    _check_dims(spec, source)
    return spec


def detect_family(config: dict[str, Any], source: str = "config.json") -> tuple[Family, str]:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch in UNSUPPORTED_ARCHITECTURES:
        raise CpmkitError(f"{source}: not supported: {arch} ({UNSUPPORTED_ARCHITECTURES[arch]}); "
                          f"supported: {', '.join(ARCHITECTURES)}")
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch], arch
    if arch is None and config.get("model_type") in _MODEL_TYPES:
        family = _MODEL_TYPES[config["model_type"]]
        return family, next(a for a, f in ARCHITECTURES.items() if f is family)
    name = arch or config.get("model_type") or "no 'architectures' or 'model_type' key"
    raise CpmkitError(f"{source}: not supported: {name}; supported: {', '.join(ARCHITECTURES)}")


def _check_dims(spec: ModelSpec, source: str) -> None:
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "vocab_size"):
        if getattr(spec, name) <= 0:
            raise CpmkitError(f"{source}: {name} must be positive, got {getattr(spec, name)}")
    if spec.num_heads % spec.num_kv_heads:
        raise CpmkitError(f"{source}: num_attention_heads {spec.num_heads} is not a multiple of "
                          f"num_key_value_heads {spec.num_kv_heads}")
    for name in ("long_factor", "short_factor"):
        factors = getattr(spec.rope, name)
        if factors is not None and len(factors) != spec.rope.dim // 2:
            raise CpmkitError(f"{source}: rope_scaling.{name} has {len(factors)} values, expected "
                              f"{spec.rope.dim // 2} (rotary dims / 2)")


_REQUIRED = object()


def _integer(config: dict[str, Any], key: str, default: Any = _REQUIRED, *, minimum: int = 1) -> int:
    """An integer config value (JSON 256.5 or "256" is not one), at least ``minimum``."""
    value = config[key] if default is _REQUIRED else config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{key} must be at least {minimum}, got {value}")
    return value


def _number(config: dict[str, Any], key: str, default: float, *, positive: bool = True) -> float:
    """A finite number (positive unless said otherwise)."""
    value = config.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{key} must be positive, got {value!r}")
    return float(value)


def _object(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be an object or null, got {value!r}")
    return value


def _rope(config: dict[str, Any], dim: int, default_theta: float, source_max: int) -> RopeSpec:
    # transformers 5 re-saves rope settings as `rope_parameters` (theta inside); older files use
    # `rope_theta` + `rope_scaling`.
    params = _object(config, "rope_parameters")
    scaling = _object(config, "rope_scaling") or params
    theta = _number(params, "rope_theta", _number(config, "rope_theta", default_theta))
    kind_name = scaling.get("rope_type", scaling.get("type", "default"))
    kind_name = {"su": "longrope"}.get(kind_name, kind_name)
    try:
        kind = RopeKind(kind_name)
    except ValueError:
        raise ValueError(f"rope_scaling type {kind_name!r} (supported: {', '.join(k.value for k in RopeKind)})")
    if kind is RopeKind.LONGROPE:
        for key in ("long_factor", "short_factor"):
            if key not in scaling:
                raise ValueError(f"longrope rope_scaling has no {key!r}")
        factors = {}
        for key in ("long_factor", "short_factor"):
            values = scaling[key]
            if not isinstance(values, list) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                    for v in values):
                raise ValueError(f"rope_scaling.{key} must be a list of positive numbers")
            factors[key] = tuple(float(v) for v in values)
        return RopeSpec(kind, theta, dim, source_max,
                        original_max_position=_integer(scaling, "original_max_position_embeddings", source_max),
                        **factors)
    factor = _number(scaling, "factor", 1.0)
    return RopeSpec(kind, theta, dim, source_max, factor=factor)


def _eos(config: dict[str, Any], default: int | None) -> tuple[int, ...]:
    eos = config.get("eos_token_id", default)
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_id must be an integer or a list of them, got {eos!r}")
    return tuple(ids)


def _common(config: dict[str, Any], family: Family, arch: str, *, head_dim: int, tie_default: bool,
            eps_default: float, theta_default: float, rope_dim: int, bos: int | None, eos: int | None) -> dict:
    notes = []
    if config.get("sparse_config"):
        notes.append("sparse_config (InfLLM-v2) is ignored: attention runs dense, as in llama.cpp and vLLM")
    max_pos = _integer(config, "max_position_embeddings", 2048)
    heads = _integer(config, "num_attention_heads")
    return dict(
        family=family,
        architecture=arch,
        hidden_size=_integer(config, "hidden_size"),
        intermediate_size=_integer(config, "intermediate_size"),
        num_layers=_integer(config, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_integer(config, "num_key_value_heads", None) if config.get("num_key_value_heads") else heads,
        head_dim=head_dim,
        vocab_size=_integer(config, "vocab_size"),
        rms_norm_eps=_number(config, "rms_norm_eps", eps_default),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", tie_default)),
        rope=_rope(config, rope_dim, theta_default, max_pos),
        bos_token_id=config.get("bos_token_id", bos),
        eos_token_ids=_eos(config, eos),
        torch_dtype=config.get("torch_dtype", config.get("dtype")),
        notes=tuple(notes),
    )


def _head_dim(config: dict[str, Any]) -> int:
    hidden, heads = _integer(config, "hidden_size"), _integer(config, "num_attention_heads")
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    return hidden // heads


def _mup(config: dict[str, Any]) -> MupSpec:
    # The remote MiniCPMConfig defaults are 1 (no scaling); every released config sets all three.
    return MupSpec(_number(config, "scale_emb", 1.0), _number(config, "scale_depth", 1.0),
                   _number(config, "dim_model_base", 1.0))


def _build_minicpm(config: dict[str, Any], arch: str) -> ModelSpec:
    head_dim = _head_dim(config)
    act_name = config.get("hidden_act", "silu")
    if act_name not in {a.value for a in Activation}:
        raise ValueError(f"hidden_act {act_name!r} (supported: silu, fatrelu)")
    act = Activation(act_name)
    experts = _integer(config, "num_experts", 0, minimum=0) if config.get("num_experts") is not None else 0
    moe = MoESpec(experts, _integer(config, "num_experts_per_tok")) if experts else None
    if moe is not None and moe.top_k > experts:
        raise ValueError(f"num_experts_per_tok {moe.top_k} is more than num_experts {experts}")
    return ModelSpec(**_common(config, Family.MINICPM, arch, head_dim=head_dim, tie_default=True,
                               eps_default=1e-6, theta_default=10000.0, rope_dim=head_dim, bos=1, eos=2),
                     activation=act, activation_threshold=_number(config, "hidden_act_param", 0.0, positive=False),
                     mup=_mup(config), moe=moe)


def _dense_layer_shapes(s: ModelSpec, i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    out = {
        p + "input_layernorm.weight": (s.hidden_size,),
        p + "post_attention_layernorm.weight": (s.hidden_size,),
        p + "self_attn.q_proj.weight": (s.num_heads * s.head_dim, s.hidden_size),
        p + "self_attn.k_proj.weight": (s.num_kv_heads * s.head_dim, s.hidden_size),
        p + "self_attn.v_proj.weight": (s.num_kv_heads * s.head_dim, s.hidden_size),
        p + "self_attn.o_proj.weight": (s.hidden_size, s.num_heads * s.head_dim),
    }
    out.update(_mlp_shapes(s, p))
    return out


def _mlp_shapes(s: ModelSpec, p: str) -> dict[str, tuple[int, ...]]:
    h, f = s.hidden_size, s.intermediate_size
    if s.moe is None:
        return {p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f)}
    out = {p + "mlp.gate.weight": (s.moe.num_experts, h)}
    for e in range(s.moe.num_experts):
        q = f"{p}mlp.experts.{e}."
        out.update({q + "w1.weight": (f, h), q + "w3.weight": (f, h), q + "w2.weight": (h, f)})
    return out


def _model_shapes(s: ModelSpec, layer_shapes) -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (s.vocab_size, s.hidden_size)}
    for i in range(s.num_layers):
        out.update(layer_shapes(s, i))
    out["model.norm.weight"] = (s.hidden_size,)
    if not s.tie_word_embeddings:
        out["lm_head.weight"] = (s.vocab_size, s.hidden_size)
    return out


def _build_minicpm3(config: dict[str, Any], arch: str) -> ModelSpec:
    hidden, heads = _integer(config, "hidden_size"), _integer(config, "num_attention_heads")
    # The remote code sets v_head_dim = hidden / heads and ignores the config key; native transformers
    # reads the key with the same default. They agree on every released config.
    mla = MLASpec(_integer(config, "q_lora_rank"), _integer(config, "kv_lora_rank"),
                  _integer(config, "qk_nope_head_dim"), _integer(config, "qk_rope_head_dim"), hidden // heads)
    return ModelSpec(**_common(config, Family.MINICPM3, arch, head_dim=mla.qk_head_dim, tie_default=True,
                               eps_default=1e-6, theta_default=10000.0, rope_dim=mla.qk_rope_head_dim,
                               bos=1, eos=2),
                     mup=_mup(config), mla=mla)


def _mla_layer_shapes(s: ModelSpec, i: int) -> dict[str, tuple[int, ...]]:
    p, m, h = f"model.layers.{i}.", s.mla, s.hidden_size
    out = {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_a_proj.weight": (m.q_lora_rank, h),
        p + "self_attn.q_a_layernorm.weight": (m.q_lora_rank,),
        p + "self_attn.q_b_proj.weight": (s.num_heads * m.qk_head_dim, m.q_lora_rank),
        p + "self_attn.kv_a_proj_with_mqa.weight": (m.kv_lora_rank + m.qk_rope_head_dim, h),
        p + "self_attn.kv_a_layernorm.weight": (m.kv_lora_rank,),
        p + "self_attn.kv_b_proj.weight": (s.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
        p + "self_attn.o_proj.weight": (h, s.num_heads * m.v_head_dim),
    }
    out.update(_mlp_shapes(s, p))
    return out


def _build_llama(config: dict[str, Any], arch: str) -> ModelSpec:
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(f"{key}=true (MiniCPM5 has no biases; biased Llama models are not supported)")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} (llama family supports silu)")
    head_dim = _integer(config, "head_dim") if config.get("head_dim") is not None else _head_dim(config)
    return ModelSpec(**_common(config, Family.LLAMA, arch, head_dim=head_dim, tie_default=False,
                               eps_default=1e-6, theta_default=10000.0, rope_dim=head_dim, bos=None,
                               eos=None))


_FAMILIES: dict[Family, _FamilyRules] = {
    Family.MINICPM: _FamilyRules(_BASE_REQUIRED, _build_minicpm,
                                 lambda s: _model_shapes(s, _dense_layer_shapes)),
    Family.MINICPM3: _FamilyRules(
        _BASE_REQUIRED + ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim"),
        _build_minicpm3, lambda s: _model_shapes(s, _mla_layer_shapes)),
    Family.LLAMA: _FamilyRules(_BASE_REQUIRED, _build_llama, lambda s: _model_shapes(s, _dense_layer_shapes)),
}
