"""llama-quantize's per-tensor type choice for a GGUF file type (src/llama-quant.cpp).

``choose_tensor_types`` reproduces ``llama_tensor_get_type``: which tensors may be quantized
(``tensor_allows_quantization``), the file type's default type, the mixture rules of
``llama_tensor_get_type_impl`` with their counters (attn_v-like tensors and ffn_down layers, in the
loader's tensor order), the tied-embedding rule, the ``n_expert == 8`` bumps, user overrides
``REGEX=TYPE`` (``--tensor-type``: matched first, and a matched tensor skips the mixture rules, as
upstream) and ``tensor_type_fallback`` for rows that are not a multiple of the block size.

Scope: the file types of ``GGUFFileType``; rules that only apply to the Falcon, GLM5-next and
BailingMoE3 architectures, to 70B LLaMA, or to IQ / MXFP4 file types are not reproduced.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType

from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.layout import BLOCKS


class GGUFFileType(str, Enum):
    """llama-quantize's file type names (CLI values), each with its ``general.file_type`` id."""

    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q8_0 = "Q8_0"
    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    Q5_0 = "Q5_0"
    Q5_1 = "Q5_1"
    Q2_K = "Q2_K"
    Q3_K_M = "Q3_K_M"
    Q4_K_S = "Q4_K_S"
    Q4_K_M = "Q4_K_M"
    Q5_K_S = "Q5_K_S"
    Q5_K_M = "Q5_K_M"
    Q6_K = "Q6_K"
    TQ1_0 = "TQ1_0"
    TQ2_0 = "TQ2_0"

    @property
    def llama_file_type(self) -> LlamaFileType:
        return _FILE_TYPES[self][0]

    @property
    def default_type(self) -> QType:
        """llama_ftype_get_default_type."""
        return _FILE_TYPES[self][1]


F = GGUFFileType
_FILE_TYPES: dict[GGUFFileType, tuple[LlamaFileType, QType]] = {
    F.F32: (LlamaFileType.ALL_F32, QType.F32),
    F.F16: (LlamaFileType.MOSTLY_F16, QType.F16),
    F.BF16: (LlamaFileType.MOSTLY_BF16, QType.BF16),
    F.Q8_0: (LlamaFileType.MOSTLY_Q8_0, QType.Q8_0),
    F.Q4_0: (LlamaFileType.MOSTLY_Q4_0, QType.Q4_0),
    F.Q4_1: (LlamaFileType.MOSTLY_Q4_1, QType.Q4_1),
    F.Q5_0: (LlamaFileType.MOSTLY_Q5_0, QType.Q5_0),
    F.Q5_1: (LlamaFileType.MOSTLY_Q5_1, QType.Q5_1),
    F.Q2_K: (LlamaFileType.MOSTLY_Q2_K, QType.Q2_K),
    F.Q3_K_M: (LlamaFileType.MOSTLY_Q3_K_M, QType.Q3_K),
    F.Q4_K_S: (LlamaFileType.MOSTLY_Q4_K_S, QType.Q4_K),
    F.Q4_K_M: (LlamaFileType.MOSTLY_Q4_K_M, QType.Q4_K),
    F.Q5_K_S: (LlamaFileType.MOSTLY_Q5_K_S, QType.Q5_K),
    F.Q5_K_M: (LlamaFileType.MOSTLY_Q5_K_M, QType.Q5_K),
    F.Q6_K: (LlamaFileType.MOSTLY_Q6_K, QType.Q6_K),
    F.TQ1_0: (LlamaFileType.MOSTLY_TQ1_0, QType.TQ1_0),
    F.TQ2_0: (LlamaFileType.MOSTLY_TQ2_0, QType.TQ2_0),
}
_FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)

# tensor_allows_quantization: name fragments never quantized (norms, MoE routers, small special weights)
_KEEP_FRAGMENTS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")

# tensor_get_category: (fragment, exact?) in match order
_CATEGORIES = (
    ("output.weight", True, "output"),
    ("token_embd.weight", True, "token_embd"),
    ("per_layer_token_embd.weight", True, "token_embd"),
    ("attn_qkv.weight", False, "attn_qkv"),
    ("attn_kv_b.weight", False, "attn_kv_b"),
    ("attn_v.weight", False, "attn_v"),
    ("attn_k.weight", False, "attn_k"),
    ("attn_q.weight", False, "attn_q"),
    ("attn_output.weight", False, "attn_output"),
    ("ffn_up", False, "ffn_up"),
    ("ffn_gate", False, "ffn_gate"),
    ("ffn_down", False, "ffn_down"),
)
# category_is_attn_v: these share the attn_v rules and counter (so upstream's separate attn_qkv rule
# after the attn_v branch is never reached)
_ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")

# fallbacks for rows that are not a multiple of the block size (tensor_type_fallback)
_FALLBACK = {
    QType.Q2_K: QType.Q4_0, QType.Q3_K: QType.Q4_0, QType.TQ1_0: QType.Q4_0, QType.TQ2_0: QType.Q4_0,
    QType.Q4_K: QType.Q5_0, QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0,
}

_ATTN_OUTPUT = {F.Q2_K: QType.Q3_K, F.Q3_K_M: QType.Q4_K}
_ATTN_OUTPUT_8_EXPERTS = (F.Q2_K, F.Q3_K_M, F.Q4_K_S, F.Q4_K_M)  # -> Q5_K


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model: GGUF name, torch-order shape (last dim = ggml ne[0], the row length;
    ``(n_expert, rows, cols)`` for MoE ``*_exps``) and its type in the source file."""

    name: str
    shape: tuple[int, ...]
    source_type: QType = QType.F32


@dataclass(frozen=True)
class TypeOverride:
    """llama-quantize ``--tensor-type REGEX=TYPE``: the first pattern found in a tensor's name wins."""

    pattern: str
    qtype: QType

    @classmethod
    def parse(cls, text: str) -> TypeOverride:
        name, sep, type_name = text.partition("=")
        if not sep or not name or not type_name:
            raise CpmkitError(f"tensor type override {text!r} must look like REGEX=TYPE (e.g. attn_v=q8_0)")
        qtype = QType.__members__.get(type_name.upper())
        if qtype not in BLOCKS:
            supported = ", ".join(t.name for t in BLOCKS)
            raise CpmkitError(f"tensor type override {text!r}: cpmkit cannot write GGML type {type_name!r}; "
                              f"supported: {supported}")
        try:
            re.compile(name.lower())
        except re.error as err:
            raise CpmkitError(f"tensor type override {text!r}: bad regular expression ({err})") from None
        return cls(name.lower(), qtype)  # llama-quantize lower-cases the pattern


@dataclass
class _Counters:
    """quantize_state_impl's running state over one pass of the tensors."""

    n_attention_wv: int
    n_layer: int
    tied_embeddings: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    patterns: list = field(default_factory=list)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth of the layers and every third one
    in between get the larger type (C integer division; i < n/8 short-circuits the negative modulo)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type_fallback(qtype: QType, row_length: int) -> QType:
    """tensor_type_fallback: a type whose block does not divide the row falls back to a 32-block type,
    and to F16 if that does not fit either."""
    if row_length % BLOCKS[qtype].block_size == 0:
        return qtype
    fallback = _FALLBACK.get(qtype, qtype)
    return fallback if row_length % BLOCKS[fallback].block_size == 0 else QType.F16


def loader_order(names: Iterable[str]) -> list[str]:
    """llama_model_loader's weights_map order (weight_name_comparer): tensors outside blocks first,
    then by block number, ties by name."""
    return sorted(names, key=lambda n: (_block_index(n), n.encode()))


def _block_index(name: str) -> int:
    m = re.match(r"blk\.([+-]?\d+)", name)
    return int(m.group(1)) if m else -1


def _category(name: str) -> str:
    for fragment, exact, category in _CATEGORIES:
        if (name == fragment) if exact else (fragment in name):
            return category
    return "other"


def allows_quantization(t: TensorSpec) -> bool:
    """tensor_allows_quantization with llama-quantize's default parameters."""
    if all(s == 1 for s in t.shape[:-1]):  # ggml_n_dims < 2
        return False
    name = t.name
    return (name.endswith("weight") and name not in _KEEP_NAMES
            and not any(fragment in name for fragment in _KEEP_FRAGMENTS))


def choose_tensor_types(tensors: Sequence[TensorSpec], file_type: GGUFFileType, *, n_layer: int,
                        n_expert: int = 0, n_gqa: int = 1, has_imatrix: bool = False,
                        overrides: Sequence[TypeOverride] = ()) -> dict[str, QType]:
    """GGUF type of every tensor for ``file_type``, as llama-quantize chooses it.

    ``n_gqa`` = n_head // n_head_kv (Q2_K gives attn_v Q4_K from 4 up); ``has_imatrix`` as for
    ``--imatrix``. The result follows llama.cpp's loader order; the input order does not matter."""
    by_name = {t.name: t for t in tensors}
    if len(by_name) != len(tensors):
        raise CpmkitError("duplicate tensor names in the model")
    names = loader_order(by_name)
    state = _Counters(
        n_attention_wv=sum(_category(n) in _ATTN_V_LIKE for n in names),
        n_layer=n_layer,
        tied_embeddings="output.weight" not in by_name,
        patterns=[(re.compile(o.pattern), o.qtype) for o in overrides],
    )
    default = file_type.default_type
    chosen = {}
    for name in names:
        t = by_name[name]
        if not allows_quantization(t):
            chosen[name] = t.source_type
            continue
        qtype = default
        if default in _FLOAT_TYPES:  # no mixture, no overrides, no fallback for float file types
            chosen[name] = qtype
            continue
        manual = next((q for pattern, q in state.patterns if pattern.search(name)), None)
        if manual is not None:
            qtype = manual
        else:
            qtype = _mixture_rule(state, t, qtype, file_type, max(1, n_expert), n_gqa, has_imatrix)
        chosen[name] = tensor_type_fallback(qtype, t.shape[-1])
    return chosen


def _layer(state_counter: int, name: str, n_expert: int, n_layer: int) -> int:
    """layer_info: the counter, or for MoE models the block number parsed from the name."""
    if n_expert == 1:
        return state_counter
    layer = _block_index(name)
    if not 0 <= layer < n_layer:
        raise CpmkitError(f"{name}: cannot tell its layer (expected blk.N. with N < {n_layer})")
    return layer


def _mixture_rule(s: _Counters, t: TensorSpec, qtype: QType, ftype: GGUFFileType, n_expert: int,
                  n_gqa: int, has_imatrix: bool) -> QType:
    """llama_tensor_get_type_impl for the file types of GGUFFileType (non-Falcon, not 70B)."""
    category = _category(t.name)
    if category == "output" or (s.tied_embeddings and category == "token_embd"):
        if t.shape[-1] % BLOCKS[qtype].block_size:
            return QType.Q8_0
        return qtype if qtype == QType.Q8_0 else QType.Q6_K
    if category == "token_embd":
        return QType.Q4_K if ftype in (F.TQ1_0, F.TQ2_0) else qtype
    if category in _ATTN_V_LIKE:
        if ftype == F.Q2_K:
            qtype = QType.Q4_K if n_gqa >= 4 else QType.Q3_K
        elif ftype == F.Q3_K_M:
            qtype = QType.Q5_K if s.i_attention_wv < 2 else QType.Q4_K
        elif ftype in (F.Q4_K_M, F.Q5_K_M) and use_more_bits(s.i_attention_wv, s.n_attention_wv):
            qtype = QType.Q6_K
        elif ftype == F.Q4_K_S and s.i_attention_wv < 4:
            qtype = QType.Q5_K
        if n_expert == 8:
            qtype = QType.Q8_0
        s.i_attention_wv += 1
        return qtype
    if category == "attn_k":
        return QType.Q8_0 if n_expert == 8 else qtype
    if category == "ffn_down":
        i_layer = _layer(s.i_ffn_down, t.name, n_expert, s.n_layer)
        n = s.n_layer
        s.i_ffn_down += 1
        if ftype == F.Q2_K:
            return QType.Q3_K
        if ftype == F.Q3_K_M:
            return QType.Q5_K if i_layer < n // 16 else QType.Q4_K
        if ftype in (F.Q4_K_M, F.Q5_K_M) and use_more_bits(i_layer, n):
            return QType.Q6_K
        if ftype == F.Q4_K_S and i_layer < n // 8:
            return QType.Q5_K
        if ftype in (F.Q4_0, F.Q5_0) and has_imatrix and i_layer < n // 8:
            return QType.Q4_1 if ftype == F.Q4_0 else QType.Q5_1
        return qtype
    if category == "attn_output":
        if n_expert == 8:
            return QType.Q5_K if ftype in _ATTN_OUTPUT_8_EXPERTS else qtype
        return _ATTN_OUTPUT.get(ftype, qtype)
    return qtype  # attn_q, ffn_gate, ffn_up and the rest: the default type (their rules are IQ-only)
