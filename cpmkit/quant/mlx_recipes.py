"""Which MLX affine setting each layer gets: a uniform setting or one of mlx-lm's mixed recipes.

Pure data and string rules, no mlx import. The decisions reproduce mlx-lm 0.32:
- ``quantize_model``'s ``wrapped_predicate`` (mlx_lm/utils.py): a layer whose input dimension
  (``weight.shape[-1]``, the hidden size for an embedding) is not divisible by the group size stays
  in float;
- ``mixed_quant_predicate_builder`` (mlx_lm/convert.py), modelled on llama.cpp's Q4_K_M: high bits
  for ``lm_head`` always, and for ``v_proj`` / ``v_a_proj`` / ``v_b_proj`` / ``down_proj`` in the
  layers where ``use_more_bits`` holds; low bits for everything else, ``embed_tokens`` included.
  Names are matched as substrings of the module path, as mlx-lm does, so MiniCPM3's
  ``kv_a_proj_with_mqa`` and ``kv_b_proj`` count as ``v_a_proj`` / ``v_b_proj``.

Callers pass only the weights of modules mlx-lm can quantize (Linear and Embedding, HF module paths
such as ``model.layers.3.mlp.down_proj``); weights with fewer than 2 dimensions (norms) stay float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cpmkit.errors import CpmkitError
from cpmkit.quant.affine import AffineSpec

DEFAULT_GROUP_SIZE = 64  # mlx's affine default, also the default of mixed_quant_predicate_builder

# Module-name substrings that get the high bits of a mixed recipe (mixed_quant_predicate_builder).
HIGH_BITS_WHEN_MORE = ("v_proj", "v_a_proj", "v_b_proj", "down_proj")
HIGH_BITS_ALWAYS = ("lm_head",)


class MlxRecipe(Protocol):
    """Anything that maps a module to its MLX affine setting, or None to keep it in float."""

    def layer_spec(self, path: str, weight_shape: tuple[int, ...], num_layers: int) -> AffineSpec | None: ...


def _quantizable(weight_shape: tuple[int, ...], group_size: int) -> bool:
    return len(weight_shape) >= 2 and weight_shape[-1] % group_size == 0


def layer_index(path: str) -> int:
    """Block index in a path like ``model.layers.3.mlp.down_proj``; 0 for paths outside the blocks
    (``lm_head``, ``model.embed_tokens``), as mlx-lm's predicate does."""
    return next((int(part) for part in path.split(".") if part.isdigit()), 0)


def use_more_bits(index: int, num_layers: int) -> bool:
    """The first and last eighth of the blocks, plus every third block in between
    (``use_more_bits`` in mlx-lm's mixed predicate, after llama.cpp's Q4_K_M)."""
    eighth = num_layers // 8
    return index < eighth or index >= 7 * num_layers // 8 or (index - eighth) % 3 == 2


@dataclass(frozen=True)
class UniformRecipe:
    """Every quantizable layer at the same setting (``mlx_lm.convert -q --q-bits B --q-group-size G``)."""

    bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        AffineSpec(self.bits, self.group_size)  # validates

    def layer_spec(self, path: str, weight_shape: tuple[int, ...], num_layers: int) -> AffineSpec | None:
        if not _quantizable(weight_shape, self.group_size):
            return None
        return AffineSpec(self.bits, self.group_size)


@dataclass(frozen=True)
class MixedRecipe:
    """One of mlx-lm's ``--quant-predicate`` recipes: low bits by default, high bits where it matters."""

    name: str
    low_bits: int
    high_bits: int
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        AffineSpec(self.low_bits, self.group_size)
        AffineSpec(self.high_bits, self.group_size)

    def layer_spec(self, path: str, weight_shape: tuple[int, ...], num_layers: int) -> AffineSpec | None:
        if not _quantizable(weight_shape, self.group_size):
            return None
        more = use_more_bits(layer_index(path), num_layers)
        high = any(key in path for key in HIGH_BITS_ALWAYS) or (
            more and any(key in path for key in HIGH_BITS_WHEN_MORE)
        )
        return AffineSpec(self.high_bits if high else self.low_bits, self.group_size)


# (low bits, high bits) of each recipe in mlx_lm.convert.QUANT_RECIPES.
MIXED_RECIPE_BITS: dict[str, tuple[int, int]] = {
    "mixed_2_6": (2, 6),
    "mixed_3_4": (3, 4),
    "mixed_3_6": (3, 6),
    "mixed_4_6": (4, 6),
}


def mixed_recipe(name: str, group_size: int = DEFAULT_GROUP_SIZE) -> MixedRecipe:
    """The mixed recipe called ``name`` (as ``mlx_lm.convert --quant-predicate`` spells it)."""
    try:
        low, high = MIXED_RECIPE_BITS[name]
    except KeyError:
        raise CpmkitError(
            f"MLX quant recipe {name!r} is unknown; use one of {', '.join(MIXED_RECIPE_BITS)}"
        ) from None
    return MixedRecipe(name, low, high, group_size)
