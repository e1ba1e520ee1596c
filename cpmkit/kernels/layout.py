"""The one weight layout every cpmkit dequant-GEMM kernel reads: K-major affine bit planes.

Every format cpmkit writes decodes, per weight ``W[n, k]`` of a Linear weight ``W [N=out, K=in]``, as

    w = d[k // block] * sub_d[k // sub_block] * (q - zero)  +  m[k // block] * sub_m[k // sub_block]

with an unsigned integer code ``q``; only the numbers in :class:`AffineLayout` differ. Q4_0 is
``d * (q - 8)``; Q4_K is ``d * sc_j * q - dmin * m_j``; MLX affine is ``scale * q + bias``. So instead of
one kernel per format, one decoder is specialised by the layout's constants (``tl.constexpr``), and
each format only needs a load-time repack into :class:`PackedWeight` (its plug-in's ``weight.py``).

Why this layout is the fast one on a GPU (loading happens once per model, so repacking is free):

* **K-major, N contiguous.** Every tensor is ``[rows along K, N]``. A tile ``[BLOCK_K, BLOCK_N]`` is then
  read as whole rows of consecutive output channels: coalesced 128-bit loads for any format, and the
  same tile feeds ``tl.dot`` as its ``[K, N]`` operand without a transpose (gemlite stores its packed
  weights the same way).
* **Codes in bit planes of 8, 4, 2 or 1 bits, packed along K into int32 words.** Odd widths are split
  the way GGUF already splits them (Q5: 4 + 1, Q6_K: 4 + 2; MLX 3-bit: 2 + 1), so no code straddles a
  word and a tile unpacks with one shift and one mask per plane: a word's ``e``-th field is code
  ``k = row * (32 // bits) + e`` (LSB first, as MLX and the GGUF ``qh`` bits already are).
* **Scales stay two-level.** K-quants keep their fp16 super-block ``d``/``dmin`` and 8-bit sub-block
  scales (the 6-bit Q4_K/Q5_K fields unpacked to a byte each), so the packed weight is about the
  file's size: Q4_K +2.8 % (4.625 vs 4.5 bits per weight), Q5_K +2.3 %, Q3_K +3.6 %; Q2_K +19 % (its
  4-bit scale and min get a byte each); Q6_K, the 32-element blocks and MLX: identical. A single fp32
  scale and bias per sub-block would cost up to 10 bits per weight for Q6_K.
* **The zero point is a constant** folded into the per-group offset ``m_eff = m - zero * d``, so the
  inner loop is one int->float conversion and one FMA per weight.
* **A per-channel scale is applied once, after the K sum** (``channel``): ``y = d * sum_k x_k (q_k - zero)
  + m * sum_k x_k``. Per-row GPTQ and ternary weights need no scale load or multiply inside the K loop; ``block``
  then only bounds the kernels' K steps.

Tensor shapes and dtypes of a :class:`PackedWeight` for ``W [N, K]``:

    lo     int32  [K * lo_bits / 32, N]    low ``lo_bits`` of each code
    hi     int32  [K * hi_bits / 32, N]    high ``hi_bits`` of each code (absent when hi_bits == 0)
    d      float  [K / block, N]           fp16/bf16/fp32, as stored by the format ([1, N] when channel)
    m      float  [K / block, N]           additive term (absent when has_m is False; [1, N] when channel)
    sub_d  int8/uint8 [K / sub_block, N]   sub-block scale (absent when sub_block == block)
    sub_m  uint8  [K / sub_block, N]       sub-block multiplier of m (present iff sub_d and m are)

A ``trits`` layout keeps TQ1_0's stored form (1.69 bits per weight) instead of 2-bit planes: per 256 weights
along K, ``lo`` holds TRIT_WORDS int32 words of TQ1_0's ``qs`` (five trits a byte) and ``hi`` one word of its
``qh`` (four trits a byte), each trit ``t`` of a byte ``b`` read as ``((b * 3**n) % 256 * 3) >> 8``, weight
``d * (t - 1)``; byte ``j`` of ``qs`` holds weights ``n * 32 + j`` (j < 32), ``160 + n * 16 + j - 32``
(j >= 32), and byte ``j`` of ``qh`` weights ``240 + n * 4 + j``, for trit ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

WORD_BITS = 32
TRIT_BLOCK = 256  # weights per TQ1_0 block
TRIT_WORDS = 12  # int32 words of five-trit bytes per block (TQ1_0's 48-byte qs)
PLANE_BITS = (1, 2, 4, 8)
# Weights repacked per step (whole rows): bounds the uint8 code temporaries to a few times 16 MiB.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class AffineLayout:
    """Decoding constants of one format; they become ``tl.constexpr`` kernel parameters."""

    lo_bits: int  # width of the low code plane: 1, 2, 4 or 8
    hi_bits: int  # width of the high code plane (0 = none); q = lo | hi << lo_bits
    zero: int  # constant subtracted from every code (Q4_0: 8, Q8_0 stored as uint8: 128, ...)
    block: int  # K elements per row of d and m
    sub_block: int  # K elements per row of sub_d / sub_m; equals block when there are none
    has_m: bool  # whether the additive term m exists
    channel: bool = False  # d and m are one per output channel, applied after the K sum (then sub_block == block)
    trits: bool = False  # ternary codes stored base-3 in TQ1_0's own order (TRIT_WORDS): only the trit kernels

    def __post_init__(self) -> None:
        assert self.lo_bits in PLANE_BITS and self.hi_bits in (0, *PLANE_BITS), self
        assert self.block % self.sub_block == 0 and _is_pow2(self.block) and _is_pow2(self.sub_block), self
        assert not (self.channel and self.has_sub), self
        assert not self.trits or (self.lo_bits, self.hi_bits, self.zero, self.block, self.sub_block, self.has_m,
                                  self.channel) == (2, 0, 1, TRIT_BLOCK, TRIT_BLOCK, False, False), self

    @property
    def bits(self) -> int:
        return self.lo_bits + self.hi_bits

    @property
    def has_sub(self) -> bool:
        return self.sub_block != self.block

    def key(self) -> str:
        """Stable text form, used in autotune cache keys."""
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True)
class PackedWeight:
    """A Linear weight ``[N, K]`` in the kernel layout (module docstring); every tensor is contiguous."""

    layout: AffineLayout
    n: int
    k: int
    lo: torch.Tensor
    hi: torch.Tensor | None
    d: torch.Tensor
    m: torch.Tensor | None
    sub_d: torch.Tensor | None
    sub_m: torch.Tensor | None
    # int64 [K]: when set, the packed K axis is the weight's in this order (GPTQ act-order, sorted so groups
    # are contiguous), and the input's features are gathered the same way (vLLM's g_idx sort)
    perm: torch.Tensor | None = None

    def __post_init__(self) -> None:
        lay, n, k = self.layout, self.n, self.k
        assert self.perm is None or tuple(self.perm.shape) == (k,), self.perm
        groups = 1 if lay.channel else k // lay.block
        expected = {
            "lo": (k // TRIT_BLOCK * TRIT_WORDS, n) if lay.trits else (k * lay.lo_bits // WORD_BITS, n),
            "hi": (k // TRIT_BLOCK, n) if lay.trits else (k * lay.hi_bits // WORD_BITS, n) if lay.hi_bits else None,
            "d": (groups, n),
            "m": (groups, n) if lay.has_m else None,
            "sub_d": (k // lay.sub_block, n) if lay.has_sub else None,
            "sub_m": (k // lay.sub_block, n) if lay.has_sub and lay.has_m else None,
        }
        for name, shape in expected.items():
            t = getattr(self, name)
            assert (t is None) == (shape is None), (name, lay)
            assert t is None or (tuple(t.shape) == shape and t.is_contiguous()), (name, None if t is None else t.shape)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, name) for name in ("lo", "hi", "d", "m", "sub_d", "sub_m")}

    @property
    def device(self) -> torch.device:
        return self.lo.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values() if t is not None)


def concat_outputs(weights: list[PackedWeight]) -> PackedWeight | None:
    """The weights of several linears over the same input side by side (``[sum N, K]``), as one; None when
    their layouts, K, input orders or tensor dtypes differ."""
    first = weights[0]
    for w in weights[1:]:
        same_perm = (w.perm is None) == (first.perm is None) and (w.perm is None or torch.equal(w.perm, first.perm))
        same_dtypes = all((a is None) == (b is None) and (a is None or a.dtype == b.dtype)
                          for a, b in zip(first.tensors().values(), w.tensors().values()))
        if w.layout != first.layout or w.k != first.k or not same_perm or not same_dtypes:
            return None
    joined = {name: None if t is None else torch.cat([w.tensors()[name] for w in weights], dim=1)
              for name, t in first.tensors().items()}
    return PackedWeight(layout=first.layout, n=sum(w.n for w in weights), k=first.k, perm=first.perm, **joined)


def pack_plane(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[R, K]`` (each ``< 2**bits``) -> int32 words ``[R, K * bits / 32]``, LSB first along K."""
    assert bits in PLANE_BITS and codes.dtype == torch.uint8, (bits, codes.dtype)
    r, k = codes.shape
    per_byte = 8 // bits
    fields_ = codes.reshape(r, k // per_byte, per_byte)  # (R, bytes, per_byte)
    packed = torch.zeros((r, k // per_byte), dtype=torch.uint8, device=codes.device)
    for e in range(per_byte):  # at most 8 bit positions, never a loop over blocks
        packed |= fields_[:, :, e] << (e * bits)
    # read as little-endian words (every CUDA and x86/ARM host): field e of word j is code j*32/bits + e
    return packed.view(torch.int32)


@dataclass(frozen=True)
class AffineCodes:
    """A weight decoded to codes and per-group constants, still row-major ``[N, ...]``; the common
    intermediate between a format's bytes and :class:`PackedWeight` (see :func:`pack_affine`)."""

    layout: AffineLayout
    codes: torch.Tensor  # uint8 [N, K]
    d: torch.Tensor  # float [N, K / block] ([N, 1] when channel)
    m: torch.Tensor | None  # float [N, K / block] ([N, 1] when channel)
    sub_d: torch.Tensor | None  # int8/uint8 [N, K / sub_block]
    sub_m: torch.Tensor | None  # uint8 [N, K / sub_block]


def pack_affine(chunks, layout: AffineLayout, n: int, k: int, perm: torch.Tensor | None = None) -> PackedWeight:
    """Assemble a :class:`PackedWeight` from :class:`AffineCodes` covering consecutive row ranges of W
    (an iterable of ``(row_start, AffineCodes)``, whose K axis is in ``perm``'s order when given),
    transposing each to K-major as it arrives."""
    lo_mask = (1 << layout.lo_bits) - 1
    out: dict[str, torch.Tensor | None] = {}
    for n0, part in chunks:
        assert part.layout == layout, (part.layout, layout)
        rows = part.codes.shape[0]
        planes = {"lo": pack_plane(part.codes & lo_mask, layout.lo_bits)}
        if layout.hi_bits:
            planes["hi"] = pack_plane(part.codes >> layout.lo_bits, layout.hi_bits)
        values = {**planes, "d": part.d, "m": part.m, "sub_d": part.sub_d, "sub_m": part.sub_m}
        for name, t in values.items():
            if t is None:
                out.setdefault(name, None)
                continue
            if name not in out:
                out[name] = torch.empty((t.shape[1], n), dtype=t.dtype, device=t.device)
            out[name][:, n0 : n0 + rows] = t.T
    return PackedWeight(layout=layout, n=n, k=k, perm=perm,
                        **{f: out.get(f) for f in ("lo", "hi", "d", "m", "sub_d", "sub_m")})


CHANNEL_BLOCK = 256


def pow2_divisor(k: int, most: int, least: int = 1) -> int:
    """The largest power of two in ``[least, most]`` that divides ``k`` (``least`` when none does)."""
    block = most
    while block > least and k % block:
        block //= 2
    return block


def scale_block(group_size: int, k: int) -> int:
    """The layout's block for scales in groups of ``group_size`` (-1: one per row of ``k``): the group itself,
    or for a per-row scale (a ``channel`` layout) the largest power of two up to CHANNEL_BLOCK dividing K, which
    only bounds the kernels' K steps."""
    return group_size if group_size != -1 else pow2_divisor(k, CHANNEL_BLOCK)


def rows_per_chunk(k: int) -> int:
    return max(1, CHUNK_ELEMENTS // k)
