"""cpmkit's ternary pack: the bytes of a linear whose weights are ``s x {-1, 0, +1}``.

Per linear ``[N, K]``:

* ``weight_packed``: uint8 ``[N, K / 4]``, the code ``t + 1`` (0, 1 or 2) of weight ``k`` of a row in bits
  ``2 (k % 4)`` of byte ``k // 4`` (the first weight in the low bits; code 3 never occurs);
* ``weight_scale``: ``[N, K / group]`` in the checkpoint's float dtype (one column per row when the scale is
  per row or per tensor), so ``W[n, k] = (code - 1) * weight_scale[n, k // group]`` in that dtype, exact.

``config.json`` carries ``quantization_config`` (:func:`ternary_quantization_config`): the method, the code,
the group size (-1: per row) and the modules left in float.
"""

from __future__ import annotations

import torch

from cpmkit.errors import CpmkitError

METHOD = "cpmkit-ternary"
VERSION = 1
CODES_PER_BYTE = 4


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[N, K]`` (0..2; K a multiple of 4) -> uint8 ``[N, K / 4]``."""
    n, k = codes.shape
    fields = codes.to(torch.uint8).reshape(n, k // CODES_PER_BYTE, CODES_PER_BYTE)
    packed = fields[..., 0] | (fields[..., 1] << 2) | (fields[..., 2] << 4) | (fields[..., 3] << 6)
    return packed.contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K / 4]`` -> uint8 codes ``[N, K]``."""
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & 3).reshape(packed.shape[0], -1)


def dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` in the scale's dtype: (code - 1) x the scale of the code's group (exact in that dtype)."""
    trits = unpack_codes(packed).to(scale.dtype) - 1
    group = trits.shape[1] // scale.shape[1]
    return trits * scale.repeat_interleave(group, dim=1)


def ternary_quantization_config(group_size: int, granularity: str, method: str, ignore: list[str]) -> dict:
    """``quantization_config`` of a ternary folder. ``granularity``: the source's own (tensor, row, groupG) or
    ``absmean-...`` for weights made ternary by cpmkit."""
    return {"quant_method": METHOD, "version": VERSION, "bits": 2, "code": "t+1", "pack": "4 per byte, low bits first",
            "group_size": group_size, "granularity": granularity, "method": method,
            "modules_to_not_convert": ignore}


def read_quantization_config(config: dict, where: str) -> dict:
    """The ternary ``quantization_config`` of a folder's config, checked; one CpmkitError line otherwise."""
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != METHOD:
        raise CpmkitError(f"{where}: quantization_config.quant_method is not {METHOD!r}")
    if q.get("version") != VERSION or q.get("bits") != 2 or q.get("code") != "t+1":
        raise CpmkitError(f"{where}: ternary pack version {q.get('version')!r}, bits {q.get('bits')!r}, code "
                          f"{q.get('code')!r}; cpmkit {VERSION} reads version {VERSION}, 2 bits, code t+1")
    group = q.get("group_size")
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        raise CpmkitError(f"{where}: quantization_config.group_size {group!r} is not -1 or a positive integer")
    return q
