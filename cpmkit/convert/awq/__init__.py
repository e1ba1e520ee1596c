"""The AWQ plug-in: activation-aware 4-bit weights with zero points in AutoAWQ's GEMM layout (vLLM's awq and
awq_marlin, transformers, GPTQModel), its GEMV layout, or compressed-tensors (3-bit too).

Variants: ``awq:<bits>bit-g<group>`` (``4bit-g128``, short ``awq:4``, ``awq:4-g64``), ``-gemv`` or ``-ct`` appended
by ``--layout``, ``-clip`` by ``--clip``. Files: ``calibrate`` (the block visitor), ``convert`` (the
folder), ``load`` (any AWQ folder as cpmkit's model). The algorithm is ``cpmkit.quant.awq``; the bit layouts
``cpmkit.formats.awq``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cpmkit.convert.plugin import (
    CALIBRATION_OPTIONS,
    ArtifactDescription,
    ConvertContext,
    FormatPlugin,
    LoadOptions,
    Location,
    Option,
    Target,
    check_calibration,
)
from cpmkit.errors import CpmkitError

_VARIANT = re.compile(r"(?P<bits>\d+)(?:bit)?(?:-g(?P<group>\d+))?")
LAYOUTS = ("gemm", "gemv", "compressed-tensors")
SUFFIXES = {"gemm": "", "gemv": "-gemv", "compressed-tensors": "-ct"}
DEFAULT_GROUP = 128
GROUP_SIZES = (32, 64, 128)


class AWQFormat(FormatPlugin):
    name = "awq"
    suffix = "AWQ"
    description = "an AWQ folder (config.json with quant_method awq, or quant_config.json)"
    default_variant = "4bit-g128"
    folder_artifact = True
    tags = ("awq",)
    library_name = "transformers"
    contract_variant = "4bit-g32"
    contract_options = {"nsamples": 4, "seqlen": 64}
    contract_max_kld = 0.05  # 4-bit is the only AutoAWQ width
    options = (
        Option("layout", str, "gemm (AutoAWQ's, the default: vLLM, transformers), gemv, or compressed-tensors "
                              "(llm-compressor's; 3-bit too)", choices=LAYOUTS),
        Option("clip", bool, "AutoAWQ's per-group clipping search too (off by default: gate and up are clipped "
                             "apart, and on the demo model their product's error made KLD several times worse)"),
        *CALIBRATION_OPTIONS,
    )

    def parse_variant(self, variant: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        match = _VARIANT.fullmatch(variant)
        if match is None:
            raise CpmkitError("expected BITS[bit][-gGROUP], e.g. awq:4bit-g128, awq:4, awq:4-g64")
        bits, group = int(match["bits"]), int(match["group"] or DEFAULT_GROUP)
        options = {k: v for k, v in options.items() if v is not False}
        layout = options.pop("layout", "gemm")
        if group not in GROUP_SIZES:
            raise CpmkitError(f"AWQ groups are {', '.join(map(str, GROUP_SIZES))} weights, not {group}")
        if bits != 4 and not (layout == "compressed-tensors" and bits in (2, 3, 8)):
            raise CpmkitError(f"{bits}-bit AWQ: AutoAWQ's gemm/gemv layouts are 4-bit; --layout compressed-tensors "
                              "also takes 2, 3 and 8")
        check_calibration(options)
        name = f"{bits}bit-g{group}{SUFFIXES[layout]}" + ("-clip" if options.get("clip") else "")
        if layout != "gemm":
            options["layout"] = layout
        return name, {**options, "bits": bits, "group_size": group}

    def capabilities(self, spec, ternary):
        return {"awq": None}

    def convert(self, ck, target: Target, out: Path, ctx: ConvertContext) -> Path:
        from cpmkit.convert.awq.convert import convert_to_awq
        from cpmkit.convert.gptq.calibrate import (
            DEFAULT_NSAMPLES,
            DEFAULT_SEQLEN,
            Calibration,
        )
        from cpmkit.quant.awq import AWQSpec
        from cpmkit.quant.groups import GroupSpec

        o = dict(target.options)
        spec = AWQSpec(GroupSpec(o["bits"], o["group_size"], sym=False), clip=o.get("clip", False))
        calibration = Calibration(o.get("calib"), o.get("calib_dataset"), o.get("nsamples", DEFAULT_NSAMPLES),
                                  o.get("seqlen", DEFAULT_SEQLEN))
        return convert_to_awq(ck, out, spec=spec, layout=o.get("layout", "gemm"), calibration=calibration,
                              device=ctx.device, overwrite=ctx.overwrite, progress=ctx.progress, log=ctx.log)

    def detect(self, path: Path) -> bool:
        from cpmkit.convert.awq.load import WEIGHT_PATTERNS, awq_config_of
        from cpmkit.convert.quantized_folder import logged_method

        if not path.is_dir() or not any(f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)):
            return False
        try:
            # a compressed-tensors folder is AWQ when cpmkit's log says so (the GPTQ reader reads its bytes)
            return awq_config_of(path) is not None or logged_method(path) == "awq"
        except CpmkitError:
            return False

    def _compressed(self, path: Path) -> bool:
        from cpmkit.convert.awq.load import awq_config_of

        return awq_config_of(path) is None

    def describe(self, path: Path) -> ArtifactDescription:
        from cpmkit.convert.awq.load import awq_folder_tensors, read_awq_config
        from cpmkit.formats import hf_folder as hf

        if self._compressed(path):
            from cpmkit.formats.gptq.config import read_gptq_config

            config = read_gptq_config(path)
            variant = f"{config.bits}bit-g{config.group_size}-ct"
        else:
            config = read_awq_config(path)
            variant = f"{config.bits}bit-g{config.group_size}{SUFFIXES[config.version]}"
        tensors = awq_folder_tensors(path)
        files = {t.file for t in tensors.values()}
        files |= {p for p in path.iterdir() if p.is_file() and p.name in (*hf.COPIED_FILES, "config.json",
                                                                           "quant_config.json")}
        if _clipped(path):
            variant += "-clip"
        return ArtifactDescription("awq", variant, tuple(sorted(files)),
                                   sum(t.entry.end - t.entry.begin for t in tensors.values()))

    def inspect(self, path: Path) -> dict[str, Any]:
        d = self.describe(path)
        spec = self.open(path, None, LoadOptions()).spec  # checks every tensor against the model
        compressed = self._compressed(path)
        vllm = "compressed-tensors WNA16 (Marlin kernels)" if compressed and d.variant.startswith(("4bit", "8bit")) \
            else None if compressed else "awq_marlin (repacked to Marlin at load; awq on older GPUs)"
        from cpmkit.convert.awq.load import read_awq_config

        layout = "compressed-tensors" if compressed else read_awq_config(path).version
        return {"format": self.name, "variant": d.variant, "path": str(path), "architecture": spec.architecture,
                "layout": layout, "file_size": d.file_size_bytes,
                "bits_per_weight": round(d.bits_per_weight(spec.parameter_count()), 4),
                "vllm": vllm or "refuses it: compressed-tensors WNA16 takes 4- or 8-bit weights"}

    def format_inspect(self, info: dict[str, Any]) -> str:
        return "\n".join([
            info["path"],
            f"  format        awq {info['variant']} ({info['architecture']}), {info['layout']} layout",
            f"  size          {info['file_size'] / 2**20:.2f} MiB, {info['bits_per_weight']} bits per weight",
            f"  vLLM          {info['vllm']}",
        ])

    def open(self, path: Path, reference, options: LoadOptions):
        if self._compressed(path):
            from cpmkit.convert.gptq.load import open_gptq

            return open_gptq(path, dtype=options.dtype, backend=options.backend,
                             cache_dequantized=options.cache_dequantized)
        from cpmkit.convert.awq.load import open_awq

        return open_awq(path, dtype=options.dtype, backend=options.backend,
                        cache_dequantized=options.cache_dequantized)

    def usage(self, target: Target, where: Location, config: dict[str, Any]) -> str:
        repo = where.repo_id
        return f"""## Run it

[vLLM](https://github.com/vllm-project/vllm) (awq_marlin on current GPUs) and
[SGLang](https://github.com/sgl-project/sglang):

```bash
vllm serve {repo}
python -m sglang.launch_server --model-path {repo}
```

[transformers](https://github.com/huggingface/transformers) with [GPTQModel](https://github.com/ModelCloud/GPTQModel)
as its AWQ backend (`pip install gptqmodel`):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```
"""


def _clipped(path: Path) -> bool:
    from cpmkit.convert.quantized_folder import read_log

    return read_log(path).get("clip") is True
