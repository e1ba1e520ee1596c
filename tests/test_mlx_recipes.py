"""Per-layer MLX settings: our recipes against what mlx-lm's quantize_model does to tiny MiniCPM models."""

import pytest

from cpmkit.errors import CpmkitError
from cpmkit.quant.affine import AFFINE_GROUP_SIZES, AffineSpec
from cpmkit.quant.mlx_recipes import (
    MIXED_RECIPE_BITS,
    UniformRecipe,
    mixed_recipe,
    use_more_bits,
)

# In-dims chosen so the divisibility rule bites: intermediate 96 (down_proj in) is not a multiple
# of 64 or 128, and MiniCPM3's kv_b_proj (in = kv_lora_rank 64) is not a multiple of 128.
TINY = dict(hidden_size=128, dim_model_base=32, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256, scale_depth=1.4, scale_emb=12.0)


def tiny_minicpm():
    from mlx_lm.models import minicpm

    return minicpm.Model(minicpm.ModelArgs(model_type="minicpm", num_hidden_layers=8, **TINY))


def tiny_minicpm3():
    from mlx_lm.models import minicpm3

    args = dict(TINY, num_key_value_heads=4)
    rope = {"original_max_position_embeddings": 256, "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}
    return minicpm3.Model(minicpm3.ModelArgs(
        model_type="minicpm3", num_hidden_layers=4, q_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16,
        kv_lora_rank=64, max_position_embeddings=256, rope_scaling=rope, **args))


def mlx_lm_decisions(model, recipe_name, group_size):
    """{module path: (bits, group_size) or None} after mlx-lm's own quantize_model."""
    pytest.importorskip("mlx.core")
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import quantize_model

    shapes = {path: tuple(m.weight.shape) for path, m in model.named_modules() if hasattr(m, "to_quantized")}
    predicate = mixed_quant_predicate_builder(recipe_name, model, group_size) if recipe_name else None
    quantize_model(model, {}, group_size, 4, quant_predicate=predicate)
    modules = dict(model.named_modules())
    decided = {}
    for path in shapes:
        m = modules[path]
        decided[path] = (m.bits, m.group_size) if hasattr(m, "scales") else None
    return shapes, decided


@pytest.mark.parametrize("build", [tiny_minicpm, tiny_minicpm3], ids=["minicpm", "minicpm3"])
@pytest.mark.parametrize("group_size", AFFINE_GROUP_SIZES)
@pytest.mark.parametrize("recipe_name", [None, *MIXED_RECIPE_BITS], ids=lambda n: n or "uniform_4")
def test_matches_mlx_lm_quantize_model(build, group_size, recipe_name):
    pytest.importorskip("mlx_lm")
    model = build()
    num_layers = len(model.layers)
    shapes, expected = mlx_lm_decisions(model, recipe_name, group_size)
    recipe = mixed_recipe(recipe_name, group_size) if recipe_name else UniformRecipe(4, group_size)
    ours = {}
    for path, shape in shapes.items():
        spec = recipe.layer_spec(path, shape, num_layers)
        ours[path] = (spec.bits, spec.group_size) if spec else None
    assert ours == expected
    # The tiny models exercise both sides of every rule: some layers stay float exactly when the
    # group size exceeds 32, and a mixed recipe uses both its bit widths.
    assert (None in expected.values()) == (group_size > 32)
    if recipe_name:
        assert len({v for v in expected.values() if v}) == 2


def test_minicpm3_kv_projections_count_as_v_projections():
    # mlx-lm matches "v_a_proj"/"v_b_proj" as substrings, which MiniCPM3's kv_* names contain.
    spec = mixed_recipe("mixed_3_6").layer_spec
    # MiniCPM3-4B shapes, 4 layers: use_more_bits holds for layers 2 and 3 only.
    assert spec("model.layers.3.self_attn.kv_a_proj_with_mqa", (320, 2560), 4) == AffineSpec(6, 64)
    assert spec("model.layers.2.self_attn.kv_b_proj", (5120, 256), 4) == AffineSpec(6, 64)
    assert spec("model.layers.1.self_attn.kv_b_proj", (5120, 256), 4) == AffineSpec(3, 64)


def test_use_more_bits_on_minicpm_2b_depth():
    # 40 layers: the first 5, the last 5, and every third one in between starting at 7.
    chosen = [i for i in range(40) if use_more_bits(i, 40)]
    assert chosen == [0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 35, 36, 37, 38, 39]


def test_norms_and_unknown_recipes():
    assert UniformRecipe().layer_spec("model.norm", (1536,), 52) is None
    assert mixed_recipe("mixed_4_6").layer_spec("model.embed_tokens", (122753, 1536), 52) == AffineSpec(4, 64)
    with pytest.raises(CpmkitError, match="mixed_5_6.*mixed_2_6, mixed_3_4"):
        mixed_recipe("mixed_5_6")
    with pytest.raises(CpmkitError, match="bits=7"):
        UniformRecipe(7, 64)
