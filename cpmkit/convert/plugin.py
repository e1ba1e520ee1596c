"""What a format plug-in is: one object per artifact format that owns everything the format means to cpmkit.

A plug-in (a subclass of :class:`FormatPlugin`, living in its own package ``cpmkit.convert.<format>``)
provides:

* its **options**: the variant it parses from ``FORMAT:VARIANT`` (``gguf:Q4_K_M``, ``mlx:4bit-g64``) and
  the named options it takes besides (:class:`Option`: ``--imatrix``, ``--dtype``, ...). The one parser,
  :func:`parse_target`, serves ``convert``, ``release``, recipes and ``--json`` alike, and refuses an
  option the format does not take;
* whether a checkpoint can become it, and why not (``capabilities``, for ``inspect`` and before converting);
* ``convert``: checkpoint in, artifact out;
* ``detect`` / ``describe`` / ``inspect`` of an artifact on disk (for ``inspect`` and ``verify``), and ``open``:
  the artifact as a :class:`~cpmkit.models.source.ModelSource` whose quantized linears run through
  ``cpmkit.kernels.QuantLinear`` with the format's own weight type;
* its model card text: folder suffix, tags, how to run it.

Adding a format is a new package and one line in ``cpmkit.convert.registry``; the contract suite
(``tests/test_format_contract.py``) runs over every registered plug-in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch

from cpmkit.checkpoint import Checkpoint
from cpmkit.errors import CpmkitError
from cpmkit.quant.ternary import TernaryGranularity
from cpmkit.spec import ModelSpec

Progress = Callable[[Iterable], Iterable]


@dataclass(frozen=True)
class Option:
    """A format option, spelled ``--name-with-dashes`` on the command line and ``name_with_underscores`` in
    recipes and ``--json``. ``kind`` is bool (a flag), int, float, str or Path; ``multiple`` options take a
    list (repeat the flag); ``choices`` restricts a str."""

    name: str
    kind: type
    help: str
    multiple: bool = False
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` (from the command line or a TOML recipe) checked and converted; a CpmkitError names
        ``where`` (the target) and the option."""
        if self.multiple:
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(Option(self.name, self.kind, self.help, False, self.choices).coerce(v, where)
                         for v in items)
        ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str), Path: lambda v: isinstance(v, (str, Path))}[self.kind]
        if not ok(value):
            raise CpmkitError(f"{where}: {self.flag} takes a {self.kind.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise CpmkitError(f"{where}: {self.flag} {value}: choose one of {', '.join(self.choices)}")
        if self.kind is Path:
            return str(Path(value))
        return float(value) if self.kind is float else value


# the options of every calibrated format (GPTQ, Marlin, AWQ), spelled and explained the same in each
CALIBRATION_OPTIONS = (
    Option("calib", Path, "calibration text (UTF-8; default: 250 kB of Shakespeare, built in; give text "
                          "like the model's own use)"),
    Option("calib_dataset", str, "calibrate on a named dataset's train split instead (wikitext2; needs a "
                                 "network and `datasets`)"),
    Option("nsamples", int, "calibration samples (default 128)"),
    Option("seqlen", int, "tokens per calibration sample (default 512)"),
)
DAMP_OPTION = Option("damp", float, "Hessian damping to start from, as a fraction of its mean diagonal (default 0.01)")


def check_calibration(options: dict[str, Any]) -> None:
    """The calibration options that cannot go together or out of range, as one CpmkitError line."""
    if options.get("calib") is not None and options.get("calib_dataset") is not None:
        raise CpmkitError("give either --calib or --calib-dataset, not both")
    for key in ("nsamples", "seqlen"):
        if key in options and options[key] < 1:
            raise CpmkitError(f"--{key} must be at least 1, got {options[key]}")


@dataclass(frozen=True)
class Target:
    """One artifact to make: ``format:variant`` plus the format's options (sorted, JSON-able), all canonical,
    so two spellings of the same artifact compare equal and name the same folder."""

    format: str
    variant: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.format}:{self.variant}"

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def options_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}


@dataclass(frozen=True)
class ArtifactDescription:
    format: str
    variant: str  # quantization within the format: Q4_K_M, 4bit-g64, mixed_4_6-g64, bfloat16
    files: tuple[Path, ...]  # what a runtime loads: the GGUF file; a folder's config, weights, tokenizer
    tensor_bytes: int  # bytes of every model tensor, quantization scales included
    notes: tuple[str, ...] = ()  # what a reader should know (contradicting config files, ...)

    @property
    def name(self) -> str:
        return f"{self.format}:{self.variant}"

    @property
    def file_size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def bits_per_weight(self, parameter_count: int) -> float:
        return 8 * self.tensor_bytes / parameter_count


@dataclass(frozen=True)
class LoadOptions:
    """How to build an artifact's model: float dtype of activations, which kernels run the quantized linears
    (``cpmkit.kernels.Backend`` value), and whether the CPU path keeps dequantized weights between calls."""

    dtype: torch.dtype = torch.float32
    backend: str = "auto"
    cache_dequantized: bool = False


@dataclass(frozen=True)
class ConvertContext:
    """What every conversion is given besides the checkpoint and the target."""

    overwrite: bool = False
    progress: Progress = iter
    device: str = "cpu"  # where calibration runs (formats that calibrate)
    log: Callable[[str], None] = field(default=lambda line: None)  # one line per stage, for pipelines


@dataclass(frozen=True)
class Location:
    """Where a card tells the reader the artifact is: its Hugging Face repo id (a placeholder org when not
    pushed) and its path inside the folder."""

    repo_id: str
    artifact: str  # file name inside the folder, or "." for a folder artifact


class FormatPlugin:
    """The base of every format plug-in; see the module docstring. Subclasses set the class attributes and
    implement the methods that raise NotImplementedError."""

    name: ClassVar[str]  # "gguf": the FORMAT of FORMAT:VARIANT, lower case
    suffix: ClassVar[str]  # "GGUF": the end of release folder and repo names
    description: ClassVar[str]  # what the artifact looks like on disk, for "not an artifact" errors
    default_variant: ClassVar[str]  # what `--to FORMAT` alone makes
    options: ClassVar[tuple[Option, ...]] = ()
    folder_artifact: ClassVar[bool]  # the artifact is a folder (its files go to the top of a release folder)
    tags: ClassVar[tuple[str, ...]] = ()  # model card tags besides minicpm/quantized/variant
    library_name: ClassVar[str | None] = None  # model card library_name
    contract_variant: ClassVar[str]  # a cheap, close-to-lossless variant the contract suite converts
    contract_options: ClassVar[dict[str, Any]] = {}  # ... with these options (small calibration, say)
    contract_max_kld: ClassVar[float] = 2e-3  # the mean KLD it must stay under on the contract fixture
    contract_checkpoint: ClassVar[str] = "minicpm4-0.5b"  # the cpmkit.testing fixture it converts

    # ---- options ---------------------------------------------------------------------------------------

    def parse_variant(self, variant: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(canonical variant, options) from the variant text and the options given (already coerced);
        may add defaults or fold options into the variant's name. Raises CpmkitError for invalid ones."""
        raise NotImplementedError

    # ---- checkpoint in -----------------------------------------------------------------------------------

    def capabilities(self, spec: ModelSpec, ternary: TernaryGranularity | None) -> dict[str, str | None]:
        """Target kind -> None when the checkpoint can become it, else why not (one sentence about what
        would go wrong in the runtime that reads the artifact). Keys start with the format's name."""
        raise NotImplementedError

    def why_not(self, spec: ModelSpec, target: Target) -> str | None:
        """Why ``target`` cannot be made from a checkpoint of ``spec`` (None: it can)."""
        return self.capabilities(spec, None)[self.name]

    def convert(self, ck: Checkpoint, target: Target, out: Path, ctx: ConvertContext) -> Path:
        """Write the artifact at ``out`` (under a temporary name, renamed when complete) and return its path."""
        raise NotImplementedError

    # ---- artifact in ---------------------------------------------------------------------------------------

    def detect(self, path: Path) -> bool:
        """Whether ``path`` is an artifact of this format: cheap, never raises for a foreign path."""
        raise NotImplementedError

    def describe(self, path: Path) -> ArtifactDescription:
        raise NotImplementedError

    def inspect(self, path: Path) -> dict[str, Any]:
        """``cpmkit inspect`` of the artifact: a JSON-able dict (``format`` and ``variant`` first)."""
        raise NotImplementedError

    def format_inspect(self, info: dict[str, Any]) -> str:
        """The human-readable form of :meth:`inspect`'s dict."""
        raise NotImplementedError

    def open(self, path: Path, reference: ModelSpec, options: LoadOptions):
        """The artifact as a ``cpmkit.models.source.ModelSource``: the model its runtime would run, read
        lazily. ``reference``: the spec of the checkpoint it is compared with (formats whose files carry no
        full config read it from there)."""
        raise NotImplementedError

    # ---- the model card ---------------------------------------------------------------------------------

    def usage(self, target: Target, where: Location, config: dict[str, Any]) -> str:
        """Markdown: how to run the artifact (the card's "Run it" section). ``config``: the artifact's
        config.json when it is a folder, else {}."""
        raise NotImplementedError

    def folder_name(self, target: Target, model_name: str) -> str:
        return f"{model_name}-{target.variant}-{self.suffix}"

    def artifact_name(self, target: Target, model_name: str) -> str:
        """The artifact's name inside a release folder ("." for a folder artifact)."""
        return "."


def ternary_exact_reason(ternary: TernaryGranularity | None) -> str | None:
    """Why a format's ternary-exact encoding (``mlx-ternary``, ``gptq-ternary``) does not apply: only ternary
    weights have one; with it, any group size no larger than the checkpoint's own scale group is lossless."""
    if ternary is None:
        return "lossless only for ternary weights; this checkpoint's linears are not ternary"
    return None


def split_target(text: str) -> tuple[str, str | None]:
    """``FORMAT[:VARIANT]`` -> (format, variant or None)."""
    fmt, sep, variant = text.strip().partition(":")
    return fmt.strip().lower(), (variant.strip() or None) if sep else None


def build_target(plugin: FormatPlugin, variant: str | None, given: dict[str, Any], where: str) -> Target:
    """A canonical Target from a variant (None: the plug-in's default) and options by name; an option the
    format does not take is an error that names the formats that do."""
    from cpmkit.convert.registry import FORMATS

    known = {o.name: o for o in plugin.options}
    options = {}
    for name, value in given.items():
        if name not in known:
            takers = [p.name for p in FORMATS.values() if any(o.name == name for o in p.options)]
            flag = "--" + name.replace("_", "-")
            why = f"it is an option of {', '.join(takers)}" if takers else "no format takes it"
            raise CpmkitError(f"{where}: {flag} does not apply to {plugin.name} ({why})")
        options[name] = known[name].coerce(value, where)
    try:
        canonical, options = plugin.parse_variant(variant or plugin.default_variant, options)
    except CpmkitError as e:
        raise CpmkitError(f"{where}: {e}") from None
    return Target(plugin.name, canonical, tuple(sorted(options.items())))


def parse_target(text: str, options: dict[str, Any] | None = None) -> Target:
    """``gguf:Q4_K_M`` (and format options by name) -> Target; one CpmkitError line otherwise."""
    from cpmkit.convert.registry import plugin_named

    fmt, variant = split_target(text)
    plugin = plugin_named(fmt, f"--to {text}")
    return build_target(plugin, variant, options or {}, f"--to {text}")
