"""Checkpoint in, mlx-lm folder out: a folder mlx-lm 0.32 loads with strict weights and runs the way the
checkpoint's own code does (facts: ../../shared/formats/MLX.md §1-§3, checked against mlx-lm 0.32.2).

What differs from ``mlx_lm.convert`` on the same checkpoint, and why:

* MiniCPM and MiniCPM3 with a tied head are written untied, with the embedding copied to an explicit
  ``lm_head.weight`` (quantized on its own). mlx-lm's tied paths skip the ``hidden/dim_model_base`` logit
  division (logits 4-16x too large) and its minicpm ``sanitize`` makes a tied config fail to load.
  MiniCPM5 (llama) stays tied: mlx-lm's llama runs a tied head through ``embed_tokens.as_linear``.
* Every config key an mlx-lm ``ModelArgs`` reads is written from the checkpoint's spec, because
  mlx-lm's defaults are not the checkpoint's: ``rope_theta`` defaults to 1e6 in minicpm/minicpm3 (the
  MiniCPM-2B config has none, meaning 1e4), llama's ``tie_word_embeddings`` to True (HF: False),
  ``model_type`` is required (the MiniCPM-2B config has none; MiniCPM4 may say ``minicpm4``, which
  mlx-lm rejects), and MiniCPM3 crashes without ``rope_scaling``.
* ``torch_dtype`` records the dtype actually written (mlx-lm keeps the source's).
* The remote-code key ``auto_map`` is dropped (no modeling ``*.py`` is copied; with it, transformers asks
  to run remote code when mlx-lm loads the tokenizer), and so is transformers-5's ``rope_parameters``
  (mlx-lm reads only ``rope_theta``/``rope_scaling``, written explicitly).

Quantized bytes equal ``mx.quantize`` of the tensor cast to the output dtype (cpmkit.quant.affine), so a
default-recipe conversion of an untied checkpoint is byte-identical to mlx-lm's, tensor by tensor.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from cpmkit.atomic import atomic_dir
from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.mlx.capability import mlx_reason
from cpmkit.errors import CpmkitError
from cpmkit.formats import hf_folder as hf
from cpmkit.formats.mlx import folder as mlx_folder
from cpmkit.formats.mlx.pack import pack_codes
from cpmkit.formats.safetensors import ShardedWriter, TensorSlot
from cpmkit.quant.affine import AffineSpec, quantize_affine
from cpmkit.quant.mlx_recipes import MlxRecipe, UniformRecipe, mixed_recipe
from cpmkit.quant.ternary import exact_ternary as exact_ternary_weight
from cpmkit.spec import Family, ModelSpec, RopeKind

Progress = Callable[[Iterable], Iterable]  # e.g. a tqdm wrapper; receives the list of per-tensor jobs

MLX_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MLX_MODEL_TYPES = {Family.MINICPM: "minicpm", Family.MINICPM3: "minicpm3", Family.LLAMA: "llama"}
# Families whose tied head mlx-lm runs without the muP logit division: always written with lm_head.
EXPLICIT_HEAD_FAMILIES = (Family.MINICPM, Family.MINICPM3)
# Replaced by what is written (quantization, rope_theta/rope_scaling) or meaningless without the remote code.
DROPPED_CONFIG_KEYS = ("_name_or_path", "auto_map", "rope_parameters", "quantization", "quantization_config")
# Weights quantized and packed per step. A block's scales and biases (at most BLOCK_ELEMENTS / 32) are
# copied out by ops small enough for torch to run on this thread (see cpmkit.quant.affine).
BLOCK_ELEMENTS = 1 << 19
EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
# transformers >= 5 cannot build a tokenizer for an unregistered model_type whose rope_scaling is longrope
# (MLX.md §3.4): mlx_lm.load needs a placeholder config for those folders.
TOKENIZER_WORKAROUND_TYPES = ("minicpm",)


@dataclass(frozen=True)
class _Job:
    """One checkpoint tensor written under ``name``: quantized when ``spec`` is set (then ``name`` ends in
    ``.weight`` and three tensors are written), else cast to the output dtype."""

    source: str
    name: str
    shape: tuple[int, ...]
    spec: AffineSpec | None

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    def slots(self, dtype: torch.dtype) -> list[TensorSlot]:
        count = math.prod(self.shape)
        if self.spec is None:
            return [TensorSlot(self.name, dtype, self.shape, count)]
        n, k = self.shape
        groups = (n, k // self.spec.group_size)
        return [TensorSlot(self.name, torch.uint32, (n, k * self.spec.bits // 32), count),
                TensorSlot(f"{self.module}.scales", dtype, groups, 0),
                TensorSlot(f"{self.module}.biases", dtype, groups, 0)]


def convert_to_mlx(ck: Checkpoint, out_dir: Path, *, bits: int = 4, group_size: int = 64, recipe: str | None = None,
                   dtype: str | None = None, quantize: bool = True, overwrite: bool = False,
                   progress: Progress = iter, tokenizer: bool = True, exact_ternary: bool = True) -> Path:
    """Write ``ck`` as an mlx-lm folder at ``out_dir`` and return it.

    ``quantize``: every Linear and Embedding becomes MLX affine ``bits``/``group_size`` (a mixed
    ``recipe`` such as ``mixed_4_6`` picks the bits per layer instead of ``bits``), except layers whose
    input dimension is not divisible by the group size, which stay float as in mlx-lm. ``dtype``
    (float16/bfloat16/float32) is the float dtype of everything else, scales included; default: the
    config's ``torch_dtype``, else the embedding's stored dtype. ``progress`` wraps the per-tensor loop
    (a list of jobs, so ``len`` works). The folder appears only when complete; an existing ``out_dir``
    is refused unless ``overwrite``. A checkpoint without tokenizer files is refused (mlx-lm cannot load
    such a folder) unless ``tokenizer`` is False.

    Raises CpmkitError for a checkpoint mlx-lm cannot run correctly (``capability.mlx_reason``) and for
    invalid options.

    ``exact_ternary``: a block linear that is ternary with one scale per group (BitCPM's) is written exactly,
    codes ``t + 1`` with scale ``s`` and bias ``-s``, where min-max rounding could not even keep its zeros.
    """
    reason = mlx_reason(ck.spec)
    if reason:
        raise CpmkitError(f"{ck.root}: cannot convert to MLX: {reason}")
    if tokenizer and not hf.has_tokenizer(ck.root):
        raise CpmkitError(f"{ck.root}: no tokenizer files ({' or '.join(hf.TOKENIZER_FILES)}); mlx-lm cannot "
                          "load a folder without one (--no-tokenizer writes it anyway)")
    plan_recipe = _recipe(bits, group_size, recipe, quantize)
    dtype_name = _dtype_name(ck, dtype)
    out_dtype = MLX_DTYPES[dtype_name]
    jobs = plan_jobs(ck.spec, plan_recipe)
    quantized = {job.module: job.spec for job in jobs if job.spec is not None}
    quantization = None
    if plan_recipe is not None:
        default = Counter(quantized.values()).most_common(1)[0][0] if quantized else AffineSpec(bits, group_size)
        quantization = mlx_folder.quantization_config(default, quantized)
    config = mlx_config(ck.config, ck.spec, dtype_name, quantization)
    slots = [slot for job in jobs for slot in job.slots(out_dtype)]

    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        with mlx_folder.folder_writer(tmp, slots) as writer:
            # zip pulls one job, then one tensor: the checkpoint streams lazily under the progress wrapper
            exact = 0
            for job, (_, tensor) in zip(progress(jobs), ck.stream([job.source for job in jobs])):
                exact += _write_job(writer, job, tensor.to(out_dtype), exact_ternary)
        mlx_folder.write_config(tmp, config)
        hf.copy_source_files(ck.root, tmp)
        _write_card(tmp, Path(out_dir).name, ck, config, plan_recipe, recipe, dtype_name, exact)
    return Path(out_dir)


def _write_job(writer: ShardedWriter, job: _Job, tensor: torch.Tensor, exact_ternary: bool) -> bool:
    """Write one job's tensors; True when it was a ternary linear written exactly."""
    if job.spec is None:
        writer.write(job.name, tensor)
        return False
    bits, group_size = job.spec.bits, job.spec.group_size
    ternary = exact_ternary and job.source.startswith("model.layers.") and exact_ternary_weight(tensor, group_size)
    if ternary:
        writer.write(job.name, pack_codes(ternary.codes, bits))
        writer.write(f"{job.module}.scales", ternary.scales)
        writer.write(f"{job.module}.biases", -ternary.scales)
        return True
    n, k = tensor.shape
    packed = torch.empty((n, k * bits // 32), dtype=torch.uint32)
    scales = torch.empty((n, k // group_size), dtype=tensor.dtype)
    biases = torch.empty_like(scales)
    # Rows are independent: quantizing and packing a block at a time keeps the uint8 codes and the
    # packer's temporaries to one block instead of the whole tensor.
    step = max(1, BLOCK_ELEMENTS // k)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        q = quantize_affine(tensor[rows], bits, group_size, job.name)
        pack_codes(q.codes, bits, out=packed[rows])
        scales[rows], biases[rows] = q.scales, q.biases
    writer.write(job.name, packed)
    writer.write(f"{job.module}.scales", scales)
    writer.write(f"{job.module}.biases", biases)
    return False


def _recipe(bits: int, group_size: int, recipe: str | None, quantize: bool) -> MlxRecipe | None:
    if not quantize:
        if recipe is not None:
            raise CpmkitError(f"MLX recipe {recipe!r} needs quantization; drop the recipe or quantize")
        return None
    return mixed_recipe(recipe, group_size) if recipe is not None else UniformRecipe(bits, group_size)


def _dtype_name(ck: Checkpoint, dtype: str | None) -> str:
    if dtype is not None:
        if dtype not in MLX_DTYPES:
            raise CpmkitError(f"MLX dtype {dtype!r} is not supported; use one of {', '.join(MLX_DTYPES)}")
        return dtype
    declared = str(ck.spec.torch_dtype or "").removeprefix("torch.")
    if declared in MLX_DTYPES:
        return declared
    stored = ck.tensors[EMBEDDING].dtype
    return next((name for name, d in MLX_DTYPES.items() if d == stored), "float32")


def plan_jobs(spec: ModelSpec, recipe: MlxRecipe | None) -> list[_Job]:
    """What is written, in order: every checkpoint tensor, then the copied head of a tied MiniCPM/MiniCPM3.
    2-D tensors are Linear/Embedding weights (MoE is refused before), quantized as ``recipe`` says."""
    shapes = spec.tensor_shapes()
    named = [(name, name, shape) for name, shape in shapes.items()]
    if spec.tie_word_embeddings and spec.family in EXPLICIT_HEAD_FAMILIES:
        named.append((EMBEDDING, HEAD, shapes[EMBEDDING]))
    jobs = []
    for source, name, shape in named:
        layer = None
        if recipe is not None and len(shape) == 2:
            assert name.endswith(".weight"), name
            layer = recipe.layer_spec(name.removesuffix(".weight"), shape, spec.num_layers)
        jobs.append(_Job(source, name, shape, layer))
    return jobs


def _rope_scaling(spec: ModelSpec, source: dict[str, Any] | None) -> dict[str, Any] | None:
    """``rope_scaling`` as mlx-lm's ``initialize_rope`` / minicpm3 ``SuScaledRoPE`` read it. ``rope_type``
    is always spelled out (mlx-lm reads ``type`` first and does not know the old name ``su``); MiniCPM3
    with plain RoPE gets unit LongRoPE factors, which mlx-lm runs as plain RoPE."""
    rope = spec.rope
    if rope.kind is RopeKind.DEFAULT and spec.family is not Family.MINICPM3:
        return None
    out = {k: v for k, v in (source or {}).items() if k != "type"}
    if rope.kind is RopeKind.DEFAULT:
        ones = [1.0] * (rope.dim // 2)
        out.update(rope_type="longrope", long_factor=ones, short_factor=ones,
                   original_max_position_embeddings=rope.max_position)
    elif rope.kind is RopeKind.LONGROPE:
        out.update(rope_type="longrope", long_factor=list(rope.long_factor), short_factor=list(rope.short_factor),
                   original_max_position_embeddings=rope.original_max_position)
    else:
        out.update(rope_type=rope.kind.value, factor=rope.factor)
    return out


def runtime_keys(spec: ModelSpec, source: dict[str, Any]) -> dict[str, Any]:
    """Every config key mlx-lm's ModelArgs for this family reads, with the value the checkpoint means."""
    keys: dict[str, Any] = {
        "model_type": MLX_MODEL_TYPES[spec.family],
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "vocab_size": spec.vocab_size,
        "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": spec.rope.max_position,
        "rope_theta": spec.rope.theta,
        "rope_scaling": _rope_scaling(spec, source.get("rope_scaling") or source.get("rope_parameters")),
        "tie_word_embeddings": spec.tie_word_embeddings and spec.family not in EXPLICIT_HEAD_FAMILIES,
    }
    if spec.mup is not None:
        keys.update(scale_emb=spec.mup.scale_emb, scale_depth=spec.mup.scale_depth,
                    dim_model_base=spec.mup.dim_model_base)
    if spec.mla is not None:
        keys.update(q_lora_rank=spec.mla.q_lora_rank, kv_lora_rank=spec.mla.kv_lora_rank,
                    qk_nope_head_dim=spec.mla.qk_nope_head_dim, qk_rope_head_dim=spec.mla.qk_rope_head_dim)
    if spec.family is Family.LLAMA:
        keys["head_dim"] = spec.head_dim
    return keys


def mlx_config(source: dict[str, Any], spec: ModelSpec, dtype_name: str,
               quantization: dict[str, Any] | None) -> dict[str, Any]:
    """The folder's config.json: the source config with the runtime keys made explicit (a source value
    that already equals the spec's is kept as written), the written dtype, and ``quantization``."""
    config = {k: v for k, v in source.items() if k not in DROPPED_CONFIG_KEYS}
    for key, value in runtime_keys(spec, source).items():
        if key not in config or config[key] != value:
            config[key] = value
    config["torch_dtype"] = dtype_name
    if "dtype" in config:  # the transformers-5 spelling
        config["dtype"] = dtype_name
    if quantization is not None:
        config["quantization"] = quantization
    return config


def needs_tokenizer_workaround(config: dict[str, Any]) -> bool:
    scaling = config.get("rope_scaling") or {}
    return config.get("model_type") in TOKENIZER_WORKAROUND_TYPES and scaling.get("rope_type") == "longrope"


def _write_card(folder: Path, title: str, ck: Checkpoint, config: dict[str, Any], plan_recipe: MlxRecipe | None,
                recipe: str | None, dtype_name: str, exact_ternary: int) -> None:
    base = ck.repo_id
    if plan_recipe is None:
        what = f"unquantized {dtype_name}"
    elif recipe is not None:
        what = f"mixed-precision affine quantization ({recipe}, group size {plan_recipe.group_size})"
    else:
        what = f"{plan_recipe.bits}-bit affine quantization (group size {plan_recipe.group_size})"
    source = f"[{base}](https://huggingface.co/{base})" if base else f"{ck.spec.architecture} checkpoint"
    summary = f"MLX version of {source}, converted by cpmkit: {what}, {dtype_name} scales and norms."
    if exact_ternary:
        summary += (f" Its {exact_ternary} ternary linears are held exactly (codes t + 1, scale s, bias -s): "
                    "the same weights as the checkpoint's.")
    mlx_folder.write_mlx_card(folder, title=title, summary=summary, usage=usage(title, config),
                                base_model=base, license_keys=hf.card_front_matter(ck.root))


def usage(model: str, config: dict[str, Any]) -> str:
    """The card's "Run it" section for the folder or Hub repo ``model`` with this ``config``."""
    install = 'pip install mlx-lm          # Linux without Apple silicon: pip install "mlx-lm[cpu]"'
    lm_studio = f"[LM Studio](https://lmstudio.ai) on Apple silicon: `lms get {model}`."
    if needs_tokenizer_workaround(config):
        return f"""## Run it

[mlx-lm](https://github.com/ml-explore/mlx-lm) (`{model}`, or the path of this folder):

```bash
{install}
```

transformers 5 cannot build the tokenizer of a LongRoPE `minicpm` config by itself (the model loads
fine), so give the tokenizer a placeholder config; `mlx_lm.generate --model` fails for the same reason.

```python
from mlx_lm import generate, load
from transformers import PretrainedConfig

model, tokenizer = load("{model}", tokenizer_config={{"config": PretrainedConfig()}})
print(generate(model, tokenizer, prompt="Hello", max_tokens=64))
```

{lm_studio}
"""
    return f"""## Run it

[mlx-lm](https://github.com/ml-explore/mlx-lm) (`{model}`, or the path of this folder):

```bash
{install}
mlx_lm.generate --model {model} --prompt "Hello"
```

```python
from mlx_lm import generate, load

model, tokenizer = load("{model}")
print(generate(model, tokenizer, prompt="Hello", max_tokens=64))
```

{lm_studio}
"""
