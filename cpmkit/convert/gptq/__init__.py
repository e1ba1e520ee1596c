"""The GPTQ plug-in: calibrated 2/3/4/8-bit weights that vLLM, SGLang, transformers (with gptqmodel) and GPTQModel
load, in AutoGPTQ's layout or llm-compressor's compressed-tensors one.

Variants: ``gptq:<bits>bit-g<group>`` (``4bit-g128``; short forms ``gptq:4``, ``gptq:4-g64``; ``-channel`` for
one group per row), with ``-actorder``, ``-static``, ``-asym`` and ``-ct`` appended by the options that change
the bytes. Files: ``calibrate`` (samples and the block visitor), ``convert`` (the folder), ``load`` (any GPTQ
folder as cpmkit's model), ``weight`` (a linear as a kernel weight), ``runtimes`` (vLLM Marlin and CPM.cu
eligibility). The algorithm is ``cpmkit.quant.gptq``; the bit layouts ``cpmkit.formats.gptq``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cpmkit.convert.plugin import (
    CALIBRATION_OPTIONS,
    DAMP_OPTION,
    ArtifactDescription,
    ConvertContext,
    FormatPlugin,
    LoadOptions,
    Location,
    Option,
    Target,
    check_calibration,
    ternary_exact_reason,
)
from cpmkit.errors import CpmkitError

_VARIANT = re.compile(r"(?P<bits>\d+)(?:bit)?(?:-(?:g(?P<group>\d+)|(?P<channel>channel)))?")
LAYOUTS = ("gptq", "compressed-tensors")
DEFAULT_GROUP = 128
CALIBRATION_NAMES = ("order", "calib", "calib_dataset", "nsamples", "seqlen", "damp")
# --order -> (act_order, static_groups) of cpmkit.quant.gptq.GPTQSpec, and the variant's suffix
ORDERS = {"static": (True, True, ""), "desc": (True, False, "-desc"), "none": (False, False, "-noorder")}


class GPTQFormat(FormatPlugin):
    name = "gptq"
    suffix = "GPTQ"
    description = "a GPTQ folder (config.json with a gptq or compressed-tensors quantization_config, or " \
                  "quantize_config.json)"
    default_variant = "4bit-g128"
    folder_artifact = True
    tags = ("gptq",)
    library_name = "transformers"
    contract_variant = "8bit-g32"
    contract_options = {"nsamples": 8, "seqlen": 64}
    options = (
        Option("order", str, "column order: static (the default: most active columns first, inside groups fixed "
                              "before the sweep, so g_idx stays k // group; llm-compressor's default), desc "
                              "(AutoGPTQ's desc_act: groups follow the order, g_idx permuted) or none",
               choices=tuple(ORDERS)),
        Option("asym", bool, "asymmetric (zero point per group; written as gptq_v2)"),
        Option("layout", str, "gptq (AutoGPTQ tensors, the default) or compressed-tensors (llm-compressor)",
               choices=LAYOUTS),
        Option("rtn", bool, "round to nearest, no calibration (llm-compressor's QuantizationModifier): fast, "
                            "and the baseline GPTQ is measured against"),
        *CALIBRATION_OPTIONS,
        DAMP_OPTION,
        Option("no_exact_ternary", bool, "quantize ternary (BitCPM) weights like any others; by default a weight "
                                         "that is ternary with one scale per group is put on the grid exactly"),
    )

    def parse_variant(self, variant: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        from cpmkit.quant.gptq import GPTQSpec
        from cpmkit.quant.groups import GroupSpec

        match = _VARIANT.fullmatch(variant)
        if match is None:
            raise CpmkitError("expected BITS[bit][-gGROUP|-channel], e.g. gptq:4bit-g128, gptq:4, gptq:8-g64")
        bits = int(match["bits"])
        group = -1 if match["channel"] else int(match["group"] or DEFAULT_GROUP)
        options = {k: v for k, v in options.items() if v is not False}
        check_calibration(options)
        GPTQSpec(GroupSpec(bits, group, not options.get("asym")), damp=options.get("damp", 0.01))  # raises
        if options.get("order") == "desc" and options.get("layout") == "compressed-tensors":
            raise CpmkitError("compressed-tensors stores no g_idx (since 0.20): --order desc cannot be written "
                              "in it; use --order static")
        calibration = [k for k in CALIBRATION_NAMES if k in options]
        if options.get("rtn") and calibration:
            raise CpmkitError(f"--rtn calibrates nothing; --{calibration[0].replace('_', '-')} does not apply")
        name = f"{bits}bit-" + ("channel" if group == -1 else f"g{group}")
        if options.get("order") == "static":
            del options["order"]  # the default, spelled out
        name += "-rtn" if options.get("rtn") else ORDERS[options.get("order", "static")][2]
        if options.get("asym"):
            name += "-asym"
        if options.get("layout") == "compressed-tensors":
            name += "-ct"
        elif "layout" in options:
            del options["layout"]  # the default, spelled out
        return name, {**options, "bits": bits, "group_size": group}

    def capabilities(self, spec, ternary):
        return {"gptq": None, "gptq-ternary": ternary_exact_reason(ternary)}

    def convert(self, ck, target: Target, out: Path, ctx: ConvertContext) -> Path:
        from cpmkit.convert.gptq.calibrate import (
            DEFAULT_NSAMPLES,
            DEFAULT_SEQLEN,
            Calibration,
        )
        from cpmkit.convert.gptq.convert import convert_to_gptq
        from cpmkit.quant.gptq import DEFAULT_DAMP, GPTQSpec
        from cpmkit.quant.groups import GroupSpec

        o = dict(target.options)
        spec = GPTQSpec(GroupSpec(o["bits"], o["group_size"], not o.get("asym", False)),
                        act_order=ORDERS[o.get("order", "static")][0], static_groups=ORDERS[o.get("order", "static")][1],
                        damp=o.get("damp", DEFAULT_DAMP))
        calibration = None if o.get("rtn") else Calibration(
            o.get("calib"), o.get("calib_dataset"), o.get("nsamples", DEFAULT_NSAMPLES),
            o.get("seqlen", DEFAULT_SEQLEN))
        return convert_to_gptq(ck, out, spec=spec, layout=o.get("layout", "gptq"), calibration=calibration,
                               exact_ternary=not o.get("no_exact_ternary", False), device=ctx.device,
                               overwrite=ctx.overwrite, progress=ctx.progress, log=ctx.log)

    def detect(self, path: Path) -> bool:
        from cpmkit.convert.gptq.load import WEIGHT_PATTERNS
        from cpmkit.convert.quantized_folder import logged_method
        from cpmkit.formats.gptq.config import quantization_config_of

        if not path.is_dir() or not any(f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)):
            return False
        if logged_method(path) == "awq":  # compressed-tensors bytes, but an AWQ artifact (the awq plug-in's)
            return False
        try:
            return quantization_config_of(path) is not None
        except CpmkitError:
            return False

    def describe(self, path: Path) -> ArtifactDescription:
        from cpmkit.convert.gptq.load import folder_tensors
        from cpmkit.formats import hf_folder as hf
        from cpmkit.formats.gptq.config import read_gptq_config

        config = read_gptq_config(path)
        tensors = folder_tensors(path)
        files = {t.file for t in tensors.values()}
        files |= {p for p in path.iterdir() if p.is_file() and p.name in (*hf.COPIED_FILES, "config.json",
                                                                           "quantize_config.json",
                                                                           "model.safetensors.index.json")}
        return ArtifactDescription("gptq", variant_of(config, path), tuple(sorted(files)),
                                   sum(t.entry.end - t.entry.begin for t in tensors.values()), config.warnings)

    def inspect(self, path: Path) -> dict[str, Any]:
        from cpmkit.convert.gptq.load import (
            folder_tensors,
            open_gptq,
            quantized_modules,
        )
        from cpmkit.convert.gptq.runtimes import cpmcu_reason, vllm_kernel
        from cpmkit.formats.gptq.config import quantization_config_of, read_gptq_config

        d = self.describe(path)
        config = read_gptq_config(path)
        source = open_gptq(path)  # checks every tensor's name, shape and dtype against the model
        spec = source.spec
        shapes = spec.tensor_shapes()
        tensors = folder_tensors(path)
        modules = quantized_modules(config, tensors)
        for _ in source.read([name for name in tensors if name.endswith(".g_idx")]):  # and their group indices
            pass
        raw = quantization_config_of(path)
        kernel, refusal = vllm_kernel(raw, [shapes[f"{m}.weight"] for m in modules])
        cpmcu = cpmcu_reason(raw, path)
        return {"format": self.name, "variant": d.variant, "path": str(path), "method": config.method,
                "bits": config.bits, "group_size": config.group_size, "sym": config.sym, "desc_act": config.desc_act,
                "checkpoint_format": config.checkpoint_format, "architecture": spec.architecture,
                "quantized_linears": len(modules), "ternary_exact_linears": ternary_exact_count(path),
                "file_size": d.file_size_bytes,
                "bits_per_weight": round(d.bits_per_weight(spec.parameter_count()), 4),
                "vllm": {"kernel": kernel, "reason": refusal},
                "cpmcu_gptq2marlin": {"accepted": cpmcu is None, "reason": cpmcu},
                "warnings": list(config.warnings)}

    def format_inspect(self, info: dict[str, Any]) -> str:
        layout = (f"checkpoint_format {info['checkpoint_format']}, desc_act {info['desc_act']}"
                  if info["method"] == "gptq" else "pack-quantized")
        vllm, cpmcu = info["vllm"], info["cpmcu_gptq2marlin"]
        lines = [
            info["path"],
            f"  format        {info['method']} {info['variant']} ({info['architecture']}), {layout}",
            f"  size          {info['file_size'] / 2**20:.2f} MiB, {info['bits_per_weight']} bits per weight, "
            f"{info['quantized_linears']} quantized linears",
            *([f"  ternary       {info['ternary_exact_linears']} ternary linears on the grid exactly (no error)"]
              if info["ternary_exact_linears"] else []),
            f"  vLLM          {vllm['kernel'] or 'refuses it: ' + vllm['reason']}",
            f"  CPM.cu        {'gptq2marlin accepts it' if cpmcu['accepted'] else 'no: ' + cpmcu['reason']}",
        ]
        return "\n".join(lines + [f"  warning       {w}" for w in info["warnings"]])

    def open(self, path: Path, reference, options: LoadOptions):
        from cpmkit.convert.gptq.load import open_gptq

        return open_gptq(path, dtype=options.dtype, backend=options.backend,
                         cache_dequantized=options.cache_dequantized)

    def usage(self, target: Target, where: Location, config: dict[str, Any]) -> str:
        from cpmkit.convert.gptq.runtimes import vllm_kernel

        repo = where.repo_id
        kernel, refusal = vllm_kernel(config.get("quantization_config") or {}, [])
        vllm = f"vLLM loads it with {kernel}." if kernel else f"Current vLLM refuses it ({refusal}); use GPTQModel."
        return f"""## Run it

[vLLM](https://github.com/vllm-project/vllm) ({vllm}) and [SGLang](https://github.com/sgl-project/sglang):

```bash
vllm serve {repo}
python -m sglang.launch_server --model-path {repo}
```

[transformers](https://github.com/huggingface/transformers) with [GPTQModel](https://github.com/ModelCloud/GPTQModel)
as its GPTQ backend (`pip install gptqmodel optimum`), or GPTQModel itself:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo}")

from gptqmodel import GPTQModel
model = GPTQModel.load("{repo}")
```
"""


def variant_of(config, folder: Path) -> str:
    """The variant name of a GPTQ folder, as ``parse_variant`` names targets (``-rtn`` from cpmkit's log)."""
    from cpmkit.convert.quantized_folder import logged_method

    name = f"{config.bits}bit-" + ("channel" if config.group_size == -1 else f"g{config.group_size}")
    if logged_method(folder) == "rtn":
        name += "-rtn"
    elif config.desc_act:
        name += "-desc"
    elif not config.static_groups:
        name += "-noorder"
    if not config.sym:
        name += "-asym"
    if config.method == "compressed-tensors":
        name += "-ct"
    return name


def ternary_exact_count(folder: Path) -> int:
    """How many linears cpmkit's log says were ternary and encoded exactly (0 without a log)."""
    from cpmkit.convert.quantized_folder import read_log

    layers = read_log(folder).get("layers")
    if not isinstance(layers, list):
        return 0
    return sum(1 for entry in layers if isinstance(entry, dict) and entry.get("method") == "ternary-exact")
