"""What ``cpmkit release --to FORMAT:VARIANT`` can make, one registration per format.

A format parses its variant text into a canonical variant and the converter's options, writes the artifact
into a release folder, and says how to run it (the model card's usage section). Spellings:

* ``gguf:<llama-quantize file type>``: ``gguf:Q8_0``, ``gguf:Q4_K_M``, ``gguf:Q2_K``, ``gguf:TQ2_0`` (ternary
  checkpoints only), ... (``cpmkit.convert.gguf_mix.GGUFFileType``).
* ``mlx:<bits>[-g<group>]`` or ``mlx:<recipe>[-g<group>]``: ``mlx:4`` (= ``mlx:4bit-g64``), ``mlx:8-g32``,
  ``mlx:mixed_4_6``; the canonical variant always names the group size (``4bit-g64``, ``mixed_4_6-g64``).

Folder (and Hugging Face repo) names: ``<name>-<variant>-<SUFFIX>``, one per artifact, e.g.
``MiniCPM4-0.5B-Q4_K_M-GGUF`` (the naming of ggml-org's GGUF-my-repo) and ``MiniCPM4-0.5B-4bit-g64-MLX``.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from cpmkit.checkpoint import Checkpoint
from cpmkit.errors import CpmkitError

Progress = Callable[[Iterable], Iterable]
MLX_STAGING = "mlx"  # convert_to_mlx's own folder inside the release folder, emptied into it
MLX_DEFAULT_GROUP = 64
_MLX_VARIANT = re.compile(r"(?:(?P<bits>\d+)(?:bit)?|(?P<recipe>mixed_\d+_\d+))(?:-g(?P<group>\d+))?")


@dataclass(frozen=True)
class Target:
    """One artifact of a release: ``format:variant`` and the converter's keyword arguments."""

    format: str
    variant: str
    options: tuple[tuple[str, Any], ...]  # sorted (key, value) pairs

    @property
    def name(self) -> str:
        return f"{self.format}:{self.variant}"

    @property
    def converter_options(self) -> dict[str, Any]:
        return dict(self.options)

    def folder_name(self, model_name: str) -> str:
        return f"{model_name}-{self.variant}-{TARGET_FORMATS[self.format].suffix}"


@dataclass(frozen=True)
class Location:
    """Where a card tells the reader the artifact is: its Hugging Face repo id (a placeholder org when not
    pushed) and its path inside the folder."""

    repo_id: str
    artifact: str  # file name inside the folder, or "." for a folder artifact


@dataclass(frozen=True)
class TargetFormat:
    name: str
    suffix: str  # of folder and repo names
    capability: str  # key of cpmkit.convert.targets.TARGETS
    tags: tuple[str, ...]  # model card tags besides minicpm/quantized/variant
    library_name: str | None  # model card library_name (the Hub infers gguf from the files)
    parse: Callable[[str], tuple[str, dict[str, Any]]]  # variant text -> canonical variant, converter options
    write: Callable[[Checkpoint, Target, Path, str, Progress], Path]  # -> artifact path inside the folder
    usage: Callable[[Target, Location, dict[str, Any]], str]  # markdown; dict: the artifact's config, if any


TARGET_FORMATS: dict[str, TargetFormat] = {}


def register_target_format(fmt: TargetFormat) -> TargetFormat:
    assert fmt.name not in TARGET_FORMATS, f"release format {fmt.name} registered twice"
    TARGET_FORMATS[fmt.name] = fmt
    return fmt


def parse_target(text: str) -> Target:
    """``gguf:Q4_K_M`` -> Target; a CpmkitError naming the spec and the valid choices otherwise."""
    fmt_name, sep, variant = text.partition(":")
    fmt = TARGET_FORMATS.get(fmt_name.strip().lower())
    if not sep or fmt is None or not variant.strip():
        raise CpmkitError(f"--to {text}: expected FORMAT:VARIANT with FORMAT one of {', '.join(TARGET_FORMATS)} "
                          "(e.g. gguf:Q4_K_M, mlx:4)")
    canonical, options = fmt.parse(variant.strip())
    return Target(fmt.name, canonical, tuple(sorted(options.items())))


def unique_targets(texts: Iterable[str]) -> tuple[Target, ...]:
    """Parsed targets in the order given, each once (``mlx:4`` and ``mlx:4bit-g64`` are the same)."""
    out: dict[str, Target] = {}
    for text in texts:
        target = parse_target(text)
        out.setdefault(target.name, target)
    return tuple(out.values())


# ---- GGUF ------------------------------------------------------------------------------------------------

def _gguf_parse(variant: str) -> tuple[str, dict[str, Any]]:
    from cpmkit.convert.gguf_mix import GGUFFileType

    names = {t.value.upper(): t.value for t in GGUFFileType}
    if variant.upper() not in names:
        raise CpmkitError(f"--to gguf:{variant}: unknown GGUF file type {variant!r}; "
                          f"one of {', '.join(names.values())}")
    file_type = names[variant.upper()]
    return file_type, {"file_type": file_type}


def _gguf_write(ck: Checkpoint, target: Target, folder: Path, model_name: str, progress: Progress) -> Path:
    from cpmkit.convert.gguf import convert_to_gguf

    return convert_to_gguf(ck, folder / f"{model_name}-{target.variant}.gguf", progress=progress,
                           **target.converter_options)


def _gguf_usage(target: Target, where: Location, config: dict[str, Any]) -> str:
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


# ---- MLX -------------------------------------------------------------------------------------------------

def _mlx_parse(variant: str) -> tuple[str, dict[str, Any]]:
    from cpmkit.quant.affine import AffineSpec
    from cpmkit.quant.mlx_recipes import mixed_recipe

    match = _MLX_VARIANT.fullmatch(variant)
    if match is None:
        raise CpmkitError(f"--to mlx:{variant}: expected BITS[-gGROUP] or RECIPE[-gGROUP], e.g. mlx:4, mlx:8-g32, "
                          "mlx:mixed_4_6")
    group = int(match["group"] or MLX_DEFAULT_GROUP)
    try:
        if match["recipe"]:
            mixed_recipe(match["recipe"], group)
            return f"{match['recipe']}-g{group}", {"recipe": match["recipe"], "group_size": group}
        bits = int(match["bits"])
        AffineSpec(bits, group)
    except CpmkitError as e:
        raise CpmkitError(f"--to mlx:{variant}: {e}") from None
    return f"{bits}bit-g{group}", {"bits": bits, "group_size": group}


def _mlx_write(ck: Checkpoint, target: Target, folder: Path, model_name: str, progress: Progress) -> Path:
    """The mlx-lm folder's files at the top of ``folder`` (a Hub repo is the folder mlx-lm loads)."""
    from cpmkit.convert.mlx import convert_to_mlx
    from cpmkit.formats.mlx_folder import CARD_NAME

    staged = convert_to_mlx(ck, folder / MLX_STAGING, progress=progress, **target.converter_options)
    for item in sorted(staged.iterdir()):
        if item.name != CARD_NAME:  # the release writes its own card
            os.replace(item, folder / item.name)
    shutil.rmtree(staged)
    return folder


def _mlx_usage(target: Target, where: Location, config: dict[str, Any]) -> str:
    from cpmkit.convert.mlx import needs_tokenizer_workaround

    model = where.repo_id
    install = 'pip install mlx-lm          # Linux without Apple silicon: pip install "mlx-lm[cpu]"'
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

[LM Studio](https://lmstudio.ai) on Apple silicon: `lms get {model}`.
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

[LM Studio](https://lmstudio.ai) on Apple silicon: `lms get {model}`.
"""


register_target_format(TargetFormat("gguf", "GGUF", "gguf", ("gguf", "llama.cpp"), None, _gguf_parse, _gguf_write,
                                    _gguf_usage))
register_target_format(TargetFormat("mlx", "MLX", "mlx", ("mlx",), "mlx", _mlx_parse, _mlx_write, _mlx_usage))
