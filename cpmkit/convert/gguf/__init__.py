"""The GGUF plug-in: llama.cpp / Ollama / LM Studio files, byte-identical to llama.cpp's converter followed by
llama-quantize.

Variants are llama-quantize's file types (``gguf:Q4_K_M``, ``gguf:Q8_0``, ``gguf:TQ2_0``, ...;
``cpmkit.convert.gguf.mix.GGUFFileType``). Files of this package: ``convert`` (one streaming pass),
``families/`` (per-family names and metadata), ``mix`` (llama-quantize's per-tensor types), ``quantize``
(quantizer worker processes), ``imatrix`` (importance matrices), ``load`` (a file as cpmkit's model),
``weight`` (a tensor as a kernel weight), ``describe`` (``inspect``), ``capability`` (what llama.cpp runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpmkit.convert.gguf.capability import gguf_reason, ternary_block_reason
from cpmkit.convert.plugin import (
    ConvertContext,
    FormatPlugin,
    LoadOptions,
    Location,
    Option,
    Target,
)
from cpmkit.errors import CpmkitError
from cpmkit.spec import Family

IMATRIX_SUFFIX = ".imatrix.gguf"  # --calib saves the computed importance matrix as OUT + this
DEFAULT_CALIB_SEQLEN = 512  # llama-imatrix's default context


class GGUFFormat(FormatPlugin):
    name = "gguf"
    suffix = "GGUF"
    description = "a GGUF file (starting with the bytes GGUF)"
    default_variant = "Q4_K_M"
    folder_artifact = False
    tags = ("gguf", "llama.cpp")
    contract_variant = "Q8_0"
    options = (
        Option("imatrix", Path, "an importance matrix (llama.cpp's imatrix GGUF or legacy .dat)"),
        Option("calib", Path, "calibration text (UTF-8): gguf computes an importance matrix from it (saved as "
                              "OUT.imatrix.gguf)"),
        Option("seqlen", int, "tokens per calibration window"),
        Option("nsamples", int, "calibration windows (gguf: at most this many, in order)"),
        Option("tensor_type", str, "quantize tensors whose GGUF name matches REGEX as TYPE (REGEX=TYPE; "
                                   "repeatable, first match wins)", multiple=True),
        Option("allow_scale_mismatch", bool, "write MiniCPM3 even though its muP scales differ from what "
                                             "llama.cpp hard-codes"),
    )

    def parse_variant(self, variant: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        from cpmkit.convert.gguf.convert import FLOAT_TYPES, file_type_named
        from cpmkit.convert.gguf.mix import TypeOverride

        ftype = file_type_named(variant)
        if options.get("imatrix") and options.get("calib"):
            raise CpmkitError("give either --imatrix or --calib, not both")
        uses = [o for o in ("imatrix", "calib", "tensor_type") if options.get(o)]
        if ftype.default_type in FLOAT_TYPES and uses:
            raise CpmkitError(f"--{uses[0].replace('_', '-')} applies to quantized file types, "
                              f"not {ftype.value}")
        for key in ("seqlen", "nsamples"):
            if key in options and not options.get("calib"):
                raise CpmkitError(f"--{key} applies only with --calib")
            if options.get(key) is not None and options[key] < 1:
                raise CpmkitError(f"--{key} must be at least 1, got {options[key]}")
        for text in options.get("tensor_type", ()):
            TypeOverride.parse(text)
        if not options.get("tensor_type"):
            options.pop("tensor_type", None)
        if not options.get("allow_scale_mismatch"):
            options.pop("allow_scale_mismatch", None)
        return ftype.value, options

    def capabilities(self, spec, ternary):
        reason = gguf_reason(spec)
        return {"gguf": reason, "gguf-ternary": reason or ternary_block_reason(ternary)}

    def why_not(self, spec, target: Target) -> str | None:
        if target.option("allow_scale_mismatch") and spec.family is Family.MINICPM3:
            return None  # the scales are the only reason given for MiniCPM3; converting warns
        return gguf_reason(spec)

    def convert(self, ck, target: Target, out: Path, ctx: ConvertContext) -> Path:
        from cpmkit.convert.gguf.convert import convert_to_gguf
        from cpmkit.convert.gguf.imatrix import compute_gguf_imatrix, save_gguf_imatrix
        from cpmkit.formats.gguf.imatrix import read_imatrix
        from cpmkit.models.text import load_text

        imatrix = None
        if target.option("imatrix"):
            imatrix = read_imatrix(target.option("imatrix"))
        elif target.option("calib"):
            calib = Path(target.option("calib"))
            ctx.log(f"{target.name}: computing the importance matrix from {calib.name}")
            imatrix = compute_gguf_imatrix(ck, load_text(calib), ctx=target.option("seqlen", DEFAULT_CALIB_SEQLEN),
                                           max_chunks=target.option("nsamples"), dataset=calib.name)
            imatrix = save_gguf_imatrix(imatrix, out.with_name(out.name + IMATRIX_SUFFIX), overwrite=ctx.overwrite)
        return convert_to_gguf(ck, out, file_type=target.variant, imatrix=imatrix,
                               tensor_types=target.option("tensor_type", ()), overwrite=ctx.overwrite,
                               progress=ctx.progress, allow_scale_mismatch=bool(target.option("allow_scale_mismatch")))

    def detect(self, path: Path) -> bool:
        from cpmkit.formats.gguf.file import is_gguf_file

        return is_gguf_file(path)

    def describe(self, path: Path):
        from collections import Counter

        from cpmkit.convert.gguf.describe import describe_gguf
        from cpmkit.convert.plugin import ArtifactDescription
        from cpmkit.formats.gguf.file import read_gguf

        info = describe_gguf(path)
        contents = read_gguf(path)
        variant = info["file_type"]
        if variant is None:  # no general.file_type: name it by its most common quantized type
            counts = Counter(t.qtype.name for t in contents.tensors.values() if len(t.shape) > 1)
            variant = counts.most_common(1)[0][0] if counts else "F32"
        return ArtifactDescription("gguf", variant, (path,), sum(t.raw.nbytes for t in contents.tensors.values()))

    def inspect(self, path: Path) -> dict[str, Any]:
        from cpmkit.convert.gguf.describe import describe_gguf

        info = describe_gguf(path)
        return {"format": self.name, "variant": info["file_type"], **info}

    def format_inspect(self, info: dict[str, Any]) -> str:
        from cpmkit.convert.gguf.describe import format_gguf_text

        return format_gguf_text(info)

    def open(self, path: Path, reference, options: LoadOptions):
        from cpmkit.convert.gguf.load import open_gguf

        # the spec comes from the file's own metadata, as llama.cpp reads it: a wrong key shows up as divergence
        return open_gguf(path, dtype=options.dtype, backend=options.backend,
                         cache_dequantized=options.cache_dequantized)

    def artifact_name(self, target: Target, model_name: str) -> str:
        return f"{model_name}-{target.variant}.gguf"

    def usage(self, target: Target, where: Location, config: dict[str, Any]) -> str:
        repo, file, quant = where.repo_id, where.artifact, target.variant
        local_name = repo.rpartition("/")[2].lower()
        return f"""## Run it

[llama.cpp](https://github.com/ggml-org/llama.cpp), from the Hub or from this folder's file:

```bash
llama-cli -hf {repo}:{quant} -p "Hello"
llama-cli -m {file} -p "Hello" -n 64
llama-server -hf {repo}:{quant}
```

[Ollama](https://ollama.com), from the Hub, or from this folder with a `Modelfile` holding the line
`FROM ./{file}`:

```bash
ollama run hf.co/{repo}:{quant}
ollama create {local_name} -f Modelfile && ollama run {local_name}
```

[LM Studio](https://lmstudio.ai): search for `{repo}` in the app, or

```bash
lms get {repo}
lms import {file}
```
"""
