"""The Marlin plug-in: OpenBMB's CPM.cu checkpoints (``MiniCPM4-8B-marlin-cpmcu``'s layout), made from a checkpoint
(calibrated GPTQ 4-bit g128, then repacked) or from an existing GPTQ folder (``--from-gptq``, no re-quantizing),
with the bytes CPM.cu's ``gptq2marlin.py`` writes for the same GPTQ input.

One variant, ``marlin:4bit-g128`` (what CPM.cu's converter accepts). Files: ``convert`` (the repack and the
calibrated path), ``load`` (any CPM.cu Marlin folder as cpmkit's model), ``capability`` (what CPM.cu runs). The
tile layout is ``cpmkit.formats.marlin``. vLLM does not read this layout (it repacks plain GPTQ to Marlin at
load instead): for vLLM, publish the GPTQ folder.
"""

from __future__ import annotations

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
)
from cpmkit.errors import CpmkitError

VARIANT = "4bit-g128"
CALIBRATION_NAMES = ("calib", "calib_dataset", "nsamples", "seqlen", "damp")
# CPM.cu takes the quantized path when the model folder's path contains one of these (case-insensitive)
CPMCU_PATH_KEYWORDS = ("marlin", "gptq", "quant", "awq", "int4", "int8", "w4a16", "qat")


class MarlinFormat(FormatPlugin):
    name = "marlin"
    suffix = "Marlin"
    description = "a CPM.cu Marlin folder (config.json and model_gptq.safetensors with fused qkv_proj/gate_up_proj)"
    default_variant = VARIANT
    folder_artifact = True
    tags = ("marlin", "gptq", "cpm.cu")
    library_name = None
    contract_variant = VARIANT
    contract_options = {"nsamples": 8, "seqlen": 64}
    contract_max_kld = 0.05  # 4-bit is the only variant
    options = (
        Option("from_gptq", Path, "repack this symmetric 4-bit g128 GPTQ folder instead of quantizing PATH "
                                  "(made from PATH; nothing is re-quantized)"),
        *CALIBRATION_OPTIONS,
        DAMP_OPTION,
    )

    def parse_variant(self, variant: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if variant not in (VARIANT, "4-g128", "4"):
            raise CpmkitError(f"CPM.cu's Marlin is 4-bit in groups of 128: marlin:{VARIANT}")
        if options.get("from_gptq") is not None:
            given = [k for k in CALIBRATION_NAMES if k in options]
            if given:
                raise CpmkitError(f"--from-gptq repacks without calibrating; --{given[0].replace('_', '-')} does "
                                  "not apply")
        check_calibration(options)
        return VARIANT, options

    def capabilities(self, spec, ternary):
        from cpmkit.convert.marlin.capability import marlin_reason

        return {"marlin": marlin_reason(spec)}

    def convert(self, ck, target: Target, out: Path, ctx: ConvertContext) -> Path:
        from cpmkit.convert.gptq.calibrate import (
            DEFAULT_NSAMPLES,
            DEFAULT_SEQLEN,
            Calibration,
        )
        from cpmkit.convert.marlin.convert import convert_to_marlin, repack_gptq
        from cpmkit.quant.gptq import DEFAULT_DAMP

        if not any(k in str(Path(out).resolve()).lower() for k in CPMCU_PATH_KEYWORDS):
            ctx.log(f"{out}: CPM.cu runs a folder as quantized only when its path contains one of "
                    f"{', '.join(CPMCU_PATH_KEYWORDS)}; rename it before loading it there")
        o = dict(target.options)
        if o.get("from_gptq") is not None:
            return repack_gptq(Path(o["from_gptq"]), out, ck, overwrite=ctx.overwrite, progress=ctx.progress)
        calibration = Calibration(o.get("calib"), o.get("calib_dataset"), o.get("nsamples", DEFAULT_NSAMPLES),
                                  o.get("seqlen", DEFAULT_SEQLEN))
        return convert_to_marlin(ck, out, calibration=calibration, damp=o.get("damp", DEFAULT_DAMP),
                                 device=ctx.device, overwrite=ctx.overwrite, progress=ctx.progress, log=ctx.log)

    def detect(self, path: Path) -> bool:
        from cpmkit.formats import marlin
        from cpmkit.formats.safetensors import read_header

        if not (path.is_dir() and (path / marlin.WEIGHTS_FILE).is_file() and (path / "config.json").is_file()):
            return False
        try:
            entries, _ = read_header(path / marlin.WEIGHTS_FILE)
        except CpmkitError:
            return False
        return any(name.endswith("qkv_proj.qweight") for name in entries)

    def describe(self, path: Path) -> ArtifactDescription:
        from cpmkit.convert.marlin.load import marlin_folder_tensors
        from cpmkit.formats import hf_folder as hf

        tensors = marlin_folder_tensors(path)
        files = {t.file for t in tensors.values()}
        files |= {p for p in path.iterdir() if p.is_file() and p.name in (*hf.COPIED_FILES, "config.json")}
        return ArtifactDescription("marlin", VARIANT, tuple(sorted(files)),
                                   sum(t.entry.end - t.entry.begin for t in tensors.values()))

    def inspect(self, path: Path) -> dict[str, Any]:
        from cpmkit.convert.marlin.capability import marlin_reason
        from cpmkit.convert.marlin.load import open_marlin

        d = self.describe(path)
        spec = open_marlin(path).spec  # checks every tensor CPM.cu reads against the config
        keyword = any(k in str(path.resolve()).lower() for k in CPMCU_PATH_KEYWORDS)
        reason = marlin_reason(spec)
        cpmcu = reason or (None if keyword else f"the folder's path has none of {', '.join(CPMCU_PATH_KEYWORDS)}, "
                                                "so CPM.cu would load it as a dense model")
        return {"format": self.name, "variant": d.variant, "path": str(path), "architecture": spec.architecture,
                "layers": spec.num_layers, "file_size": d.file_size_bytes,
                "bits_per_weight": round(d.bits_per_weight(spec.parameter_count()), 4),
                "cpmcu": {"loads": cpmcu is None, "reason": cpmcu},
                "vllm": "no: CPM.cu's fused Marlin layout; vLLM serves the GPTQ folder it came from"}

    def format_inspect(self, info: dict[str, Any]) -> str:
        cpmcu = info["cpmcu"]
        return "\n".join([
            info["path"],
            f"  format        marlin {info['variant']} ({info['architecture']}, {info['layers']} layers), CPM.cu layout",
            f"  size          {info['file_size'] / 2**20:.2f} MiB, {info['bits_per_weight']} bits per weight",
            f"  CPM.cu        {'loads it' if cpmcu['loads'] else 'no: ' + cpmcu['reason']}",
            f"  vLLM          {info['vllm']}",
        ])

    def open(self, path: Path, reference, options: LoadOptions):
        from cpmkit.convert.marlin.load import open_marlin

        return open_marlin(path, dtype=options.dtype, backend=options.backend,
                           cache_dequantized=options.cache_dequantized)

    def usage(self, target: Target, where: Location, config: dict[str, Any]) -> str:
        repo = where.repo_id
        local = repo.rpartition("/")[2]
        return f"""## Run it

[CPM.cu](https://github.com/OpenBMB/CPM.cu) (CUDA) runs this layout; it takes the quantized path because the
folder's name contains "marlin":

```bash
git clone https://github.com/OpenBMB/CPM.cu.git --recursive && cd CPM.cu && pip install .
huggingface-cli download {repo} --local-dir {local}
python -m cpmcu.cli --model-path {local} --prompt-text "Tell me about Tsinghua University"
```

vLLM, SGLang and transformers do not read CPM.cu's fused Marlin tensors: use the GPTQ artifact instead (vLLM
repacks it to Marlin at load).
"""
