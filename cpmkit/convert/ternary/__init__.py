"""The ternary plug-in: BitCPM-style checkpoints (weights stored as ``s x {-1, 0, +1}`` in BF16) packed at 2 bits
per weight plus their scales, exactly, in cpmkit's ternary pack (``cpmkit.formats.ternary``); or any checkpoint
made ternary by BitNet b1.58's absmean rule (lossy).

Variants: ``ternary:2bit`` (exact, the default: the checkpoint's own granularity, per tensor, row or group of
128/64/32, found by reading the weights; refused naming the first linear that is not ternary), ``ternary:bitnet``
(exact, transformers' BitNet layout, for checkpoints ternary per tensor only), and
``ternary:2bit-absmean`` (per row) or ``ternary:2bit-absmean-g<group>`` (short ``ternary:absmean[-gG]``). Files:
``convert`` (the pack), ``load`` (the folder as cpmkit's model), ``weight`` (the kernels' view).
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
    Target,
)
from cpmkit.errors import CpmkitError

_VARIANT = re.compile(r"(?:2bit|exact)|bitnet|(?:2bit-)?absmean(?:-g(?P<group>\d+))?")
GROUP_SIZES = (32, 64, 128, 256)
ABSMEAN_WARNING = ("ternary:absmean makes every block linear ternary with BitNet b1.58's rule: a model not trained "
                   "for ternary weights loses most of its quality (verify it)")


class TernaryFormat(FormatPlugin):
    name = "ternary"
    suffix = "Ternary"
    description = "a ternary pack folder (config.json with quant_method cpmkit-ternary)"
    default_variant = "2bit"
    folder_artifact = True
    tags = ("ternary", "bitcpm")
    library_name = None
    contract_variant = "2bit"
    contract_checkpoint = "bitcpm4"
    contract_max_kld = 1e-6  # lossless

    def parse_variant(self, variant: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        match = _VARIANT.fullmatch(variant)
        if match is None:
            raise CpmkitError("expected 2bit (exact, the default), bitnet (exact, transformers' layout) or "
                              "absmean[-gGROUP], e.g. ternary:2bit, ternary:absmean-g64")
        if variant == "bitnet":
            return "bitnet", {**options, "bitnet": True}
        if "absmean" not in variant:
            return "2bit", options
        if match["group"] is None:
            return "2bit-absmean", {**options, "absmean": True}
        group = int(match["group"])
        if group not in GROUP_SIZES:
            raise CpmkitError(f"absmean groups are {', '.join(map(str, GROUP_SIZES))} weights, not {group}")
        return f"2bit-absmean-g{group}", {**options, "absmean": True, "group_size": group}

    def capabilities(self, spec, ternary):
        if ternary is None:
            not_ternary = "its linears are not ternary: only ternary:absmean (BitNet's rule, lossy) packs them"
            return {"ternary": not_ternary, "ternary-bitnet": not_ternary}
        per_tensor = ternary.value == "tensor"
        return {"ternary": None, "ternary-bitnet": None if per_tensor else (
            f"transformers' BitNet layout holds one scale per tensor; these weights are ternary per {ternary.value}")}

    def why_not(self, spec, target: Target) -> str | None:
        return None  # whether the weights are ternary shows only in them: convert reads them and says

    def convert(self, ck, target: Target, out: Path, ctx: ConvertContext) -> Path:
        import warnings

        from cpmkit.convert.ternary.convert import convert_to_ternary

        absmean = target.option("absmean", False)
        if absmean:
            warnings.warn(f"{ck.root}: {ABSMEAN_WARNING}", stacklevel=2)
        return convert_to_ternary(ck, out, absmean=absmean, absmean_group=target.option("group_size"),
                                  bitnet_layout=target.option("bitnet", False), overwrite=ctx.overwrite,
                                  progress=ctx.progress, log=ctx.log)

    def detect(self, path: Path) -> bool:
        from cpmkit.convert.ternary.load import read_ternary_config

        if not path.is_dir() or not (path / "config.json").is_file():
            return False
        try:
            read_ternary_config(path)
        except CpmkitError:
            return False
        return True

    def describe(self, path: Path) -> ArtifactDescription:
        from cpmkit.convert.ternary.load import (
            read_ternary_config,
            ternary_folder_tensors,
        )
        from cpmkit.formats import hf_folder as hf

        _, q = read_ternary_config(path)
        tensors = ternary_folder_tensors(path)
        files = {t.file for t in tensors.values()}
        files |= {p for p in path.iterdir() if p.is_file() and p.name in (*hf.COPIED_FILES, "config.json")}
        return ArtifactDescription("ternary", _variant(q), tuple(sorted(files)),
                                   sum(t.entry.end - t.entry.begin for t in tensors.values()))

    def inspect(self, path: Path) -> dict[str, Any]:
        from cpmkit.convert.ternary.load import read_ternary_config

        d = self.describe(path)
        spec = self.open(path, None, LoadOptions()).spec
        _, q = read_ternary_config(path)
        return {"format": self.name, "variant": d.variant, "path": str(path), "architecture": spec.architecture,
                "granularity": q.get("granularity", "tensor"), "lossless": q.get("method", "exact") == "exact",
                "file_size": d.file_size_bytes,
                "bits_per_weight": round(d.bits_per_weight(spec.parameter_count()), 4)}

    def format_inspect(self, info: dict[str, Any]) -> str:
        how = "exact: the checkpoint's own weights" if info["lossless"] else "made ternary by cpmkit (lossy)"
        return "\n".join([
            info["path"],
            f"  format        ternary {info['variant']} ({info['architecture']}), scales per {info['granularity']}",
            f"  weights       {how}",
            f"  size          {info['file_size'] / 2**20:.2f} MiB, {info['bits_per_weight']} bits per weight",
        ])

    def open(self, path: Path, reference, options: LoadOptions):
        from cpmkit.convert.ternary.load import open_ternary

        return open_ternary(path, dtype=options.dtype, backend=options.backend,
                            cache_dequantized=options.cache_dequantized)

    def usage(self, target: Target, where: Location, config: dict[str, Any]) -> str:
        if target.variant == "bitnet":
            return f"""## Run it

transformers' BitNet layout (`quant_method: bitnet`, `linear_class: autobitlinear`, offline): each linear's
ternary codes packed four rows to a byte and one scale per tensor, exactly the checkpoint's weights. cpmkit reads it
(`cpmkit inspect`, `verify`); transformers loads it with its BitNet quantizer where it knows the architecture, and
then quantizes activations to int8 per token (BitNet b1.58's runtime), so its outputs differ from the BF16
model's even though the weights do not.

```bash
huggingface-cli download {where.repo_id} --local-dir bitnet && cpmkit inspect bitnet
```
"""
        return f"""## Run it

cpmkit's ternary pack: 2-bit codes (t + 1, four per byte along each row) and the checkpoint's own scales, in
safetensors; `config.json`'s `quantization_config` says how. cpmkit reads it, and its verify and release commands
run it with cpmkit's Triton kernels:

```bash
pip install cpmkit
huggingface-cli download {where.repo_id} --local-dir ternary && cpmkit inspect ternary
```

For llama.cpp, Ollama and LM Studio, the same weights losslessly: the `gguf:TQ2_0` and `gguf:TQ1_0` files of this
release (where every 256 weights share a scale).
"""


def _variant(q: dict) -> str:
    if q.get("quant_method") == "bitnet":
        return "bitnet"
    if q.get("method") != "absmean":
        return "2bit"
    return "2bit-absmean" + (f"-g{q['group_size']}" if q["group_size"] > 0 else "")
