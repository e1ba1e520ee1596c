"""The MLX plug-in: mlx-lm folders whose quantized tensors equal ``mx.quantize`` bit for bit.

Variants: ``mlx:<bits>bit-g<group>`` (``4bit-g64``; short forms ``mlx:4``, ``mlx:4-g64``), a mixed recipe
``mlx:mixed_4_6-g64`` (``mixed_2_6``, ``mixed_3_4``, ``mixed_3_6``, ``mixed_4_6``), or an unquantized dtype
(``mlx:bfloat16``, ``mlx:float16``, ``mlx:float32``). Files: ``convert`` (checkpoint in, folder out),
``load`` (a folder as cpmkit's model, read the way mlx-lm reads it), ``weight`` (a layer as a kernel
weight), ``capability`` (what mlx-lm runs).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cpmkit.convert.plugin import (
    ArtifactDescription,
    ConvertContext,
    FormatPlugin,
    LoadOptions,
    Location,
    Option,
    Target,
    ternary_exact_reason,
)
from cpmkit.errors import CpmkitError

DEFAULT_GROUP = 64
DTYPES = ("bfloat16", "float16", "float32")
_QUANTIZED = re.compile(r"(?:(?P<bits>\d+)(?:bit)?|(?P<recipe>mixed_\d+_\d+))(?:-g(?P<group>\d+))?")
METADATA_FORMAT = "mlx"  # safetensors __metadata__ "format" of files mlx writes


class MLXFormat(FormatPlugin):
    name = "mlx"
    suffix = "MLX"
    description = "an MLX folder (config.json with 'quantization', or safetensors with format=mlx)"
    default_variant = "4bit-g64"
    folder_artifact = True
    tags = ("mlx",)
    library_name = "mlx"
    contract_variant = "8bit-g32"
    options = (
        Option("dtype", str, "dtype of the float tensors and scales (default: the checkpoint's)", choices=DTYPES),
        Option("no_tokenizer", bool, "write the folder even though the checkpoint has no tokenizer files"),
        Option("no_exact_ternary", bool, "quantize ternary (BitCPM) weights like any others; by default a weight "
                                         "that is ternary with one scale per group is held exactly"),
    )

    def parse_variant(self, variant: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        from cpmkit.quant.affine import AffineSpec
        from cpmkit.quant.mlx_recipes import mixed_recipe

        if not options.get("no_tokenizer"):
            options.pop("no_tokenizer", None)
        if variant in DTYPES:
            if options.get("dtype") not in (None, variant):
                raise CpmkitError(f"--dtype {options['dtype']} contradicts the variant")
            return variant, {**options, "quantize": False, "dtype": variant}
        match = _QUANTIZED.fullmatch(variant)
        if match is None:
            raise CpmkitError("expected BITS[bit][-gGROUP], RECIPE[-gGROUP] or a dtype, e.g. "
                              "mlx:4bit-g64, mlx:8-g32, mlx:mixed_4_6, mlx:bfloat16")
        group = int(match["group"] or DEFAULT_GROUP)
        if match["recipe"]:
            mixed_recipe(match["recipe"], group)  # raises for an unknown recipe or group size
            return f"{match['recipe']}-g{group}", {**options, "recipe": match["recipe"], "group_size": group}
        bits = int(match["bits"])
        AffineSpec(bits, group)  # raises for unsupported bits or group size
        return f"{bits}bit-g{group}", {**options, "bits": bits, "group_size": group}

    def capabilities(self, spec, ternary):
        from cpmkit.convert.mlx.capability import mlx_reason

        reason = mlx_reason(spec)
        return {"mlx": reason, "mlx-ternary": reason or ternary_exact_reason(ternary)}

    def convert(self, ck, target: Target, out: Path, ctx: ConvertContext) -> Path:
        from cpmkit.convert.mlx.convert import convert_to_mlx

        o = dict(target.options)
        return convert_to_mlx(ck, out, bits=o.get("bits", 4), group_size=o.get("group_size", DEFAULT_GROUP),
                              recipe=o.get("recipe"), dtype=o.get("dtype"), quantize=o.get("quantize", True),
                              overwrite=ctx.overwrite, progress=ctx.progress, tokenizer=not o.get("no_tokenizer"),
                              exact_ternary=not o.get("no_exact_ternary"))

    def detect(self, path: Path) -> bool:
        from cpmkit.formats import safetensors as st
        from cpmkit.formats.mlx import folder as mlx_folder

        if not (path / mlx_folder.CONFIG_NAME).is_file():
            return False
        try:
            config = mlx_folder.read_config(path)
        except CpmkitError:
            return False
        if isinstance(config.get("quantization"), dict):
            return True
        weights = sorted(path.glob(mlx_folder.WEIGHT_GLOB))
        if not weights:
            return False
        try:
            _, metadata = st.read_header(weights[0])
        except CpmkitError:
            return False
        return (metadata or {}).get("format") == METADATA_FORMAT

    def describe(self, path: Path) -> ArtifactDescription:
        from cpmkit.formats.mlx import folder as mlx_folder

        config = mlx_folder.read_config(path)
        tensors = mlx_folder.index_tensors(path)
        tensor_bytes = sum(t.entry.end - t.entry.begin for t in tensors.values())
        return ArtifactDescription("mlx", _variant(path, config), artifact_files(path), tensor_bytes)

    def inspect(self, path: Path) -> dict[str, Any]:
        from cpmkit.convert.mlx.load import open_mlx

        d = self.describe(path)
        source = open_mlx(path)  # checks the config against the tensors, as mlx-lm's strict load does
        spec = source.spec
        return {"format": self.name, "variant": d.variant, "path": str(path), "model_type": spec.family.value,
                "architecture": spec.architecture, "layers": spec.num_layers, "hidden_size": spec.hidden_size,
                "vocab_size": spec.vocab_size, "files": [f.name for f in d.files],
                "file_size": d.file_size_bytes, "tensor_bytes": d.tensor_bytes,
                "bits_per_weight": round(d.bits_per_weight(spec.parameter_count()), 4)}

    def format_inspect(self, info: dict[str, Any]) -> str:
        return "\n".join([
            info["path"],
            f"  format        mlx {info['variant']} ({info['model_type']}, {info['architecture']})",
            f"  shape         {info['layers']} layers, hidden {info['hidden_size']}, vocab {info['vocab_size']}",
            f"  size          {info['file_size'] / 2**20:.2f} MiB, {info['bits_per_weight']} bits per weight",
            f"  files         {', '.join(info['files'])}",
        ])

    def open(self, path: Path, reference, options: LoadOptions):
        from cpmkit.convert.mlx.load import open_mlx

        return open_mlx(path, dtype=options.dtype, backend=options.backend,
                        cache_dequantized=options.cache_dequantized)

    def usage(self, target: Target, where: Location, config: dict[str, Any]) -> str:
        from cpmkit.convert.mlx.convert import usage

        return usage(where.repo_id, config)


def _variant(path: Path, config: dict[str, Any]) -> str:
    """``4bit-g64``; ``mixed_4_6-g64`` when layers differ in bits (the name of mlx-lm's recipe); the float
    dtype when unquantized."""
    quantization = config.get("quantization")
    if not isinstance(quantization, dict):
        return str(config.get("torch_dtype") or config.get("dtype") or "float")
    bits = {quantization.get("bits")} | {v.get("bits") for v in quantization.values() if isinstance(v, dict)}
    bits.discard(None)
    if not bits or not all(isinstance(b, int) for b in bits):
        raise CpmkitError(f"{path / 'config.json'}: 'quantization' gives no integer 'bits'")
    low, high = min(bits), max(bits)
    label = f"{low}bit" if low == high else f"mixed_{low}_{high}"
    return f"{label}-g{quantization.get('group_size')}"


def artifact_files(path: Path) -> tuple[Path, ...]:
    """The files mlx-lm reads from the folder: config, index, weights and the copied tokenizer files."""
    from cpmkit.formats import hf_folder as hf
    from cpmkit.formats.mlx import folder as mlx_folder

    names = {mlx_folder.CONFIG_NAME, mlx_folder.INDEX_NAME, *hf.COPIED_FILES}
    files = {p for p in path.iterdir() if p.is_file() and p.name in names}
    files |= {p for pattern in (mlx_folder.WEIGHT_GLOB, *hf.COPIED_GLOBS) for p in path.glob(pattern)}
    return tuple(sorted(files))
