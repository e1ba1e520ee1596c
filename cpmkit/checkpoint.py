"""Open a MiniCPM checkpoint (local folder, Hugging Face repo id, or ``demo``) and stream its tensors.

Opening reads config.json and every weight file's header or index, and checks that the tensor names
and shapes are exactly what the config implies; no tensor data is read until it is streamed, one tensor
at a time, so peak memory stays near the largest tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch

from cpmkit.errors import CpmkitError
from cpmkit.formats import safetensors as st
from cpmkit.formats.torch_bin import load_state_dict
from cpmkit.jsonfile import read_json_object
from cpmkit.spec import DROPPED_TENSOR_SUFFIXES, ModelSpec, read_spec

DEMO_NAME = "demo"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_CACHE_DIR = re.compile(r"models--([^/]+?)--(.+)")
# What a download fetches: config, weights in either format, tokenizer and template files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer.model", "*.jinja", "*.txt", "README.md"]


def demo_path() -> Path:
    return Path(__file__).parent / "demo" / "model"


def is_hub_id(source: str | Path) -> bool:
    """True when ``source`` names a Hugging Face repo rather than a local path or ``demo``."""
    return not Path(source).exists() and str(source) != DEMO_NAME and bool(_REPO_ID.fullmatch(str(source)))


def hub_repo_id(root: Path) -> str | None:
    """``org/name`` when ``root`` lies in a Hugging Face cache snapshot (``.../models--org--name/snapshots/<rev>``),
    which is where a downloaded checkpoint lives. config.json's ``_name_or_path`` is no guide: MiniCPM-2B's says
    ``openbmb/CPM-2B``, a repo that does not exist."""
    for part in root.resolve().parts:
        if match := _HUB_CACHE_DIR.fullmatch(part):
            return f"{match.group(1)}/{match.group(2)}"
    return None


def resolve_source(source: str | Path) -> Path:
    """A local folder, ``demo``, or a Hugging Face repo id (downloaded when a network exists)."""
    path = Path(source)
    if path.exists():
        return path
    if str(source) == DEMO_NAME:
        return demo_path()
    if is_hub_id(source):
        return _download(str(source))
    raise CpmkitError(f"{source}: no such file or directory")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CpmkitError(f"{repo_id}: not a local path; downloading a Hugging Face repo needs "
                          "`pip install cpmkit[hub]`") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types (offline, 404, auth); all mean "not fetched"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CpmkitError(f"{repo_id}: not a local path and the download failed: {first}") from None


@dataclass(frozen=True)
class WeightRef:
    """Where one tensor lives: a file and, for safetensors, its header entry."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    entry: st.TensorEntry | None  # None for .bin files


class Checkpoint:
    """A validated checkpoint folder. ``tensors`` maps every used tensor name to its location; names
    the model does not use (rotary caches, a tied model's redundant lm_head) are listed in ``dropped``."""

    def __init__(self, root: Path, *, allow_nonfinite: bool = False):
        self.root = root
        self.allow_nonfinite = allow_nonfinite
        if not root.is_dir():
            raise CpmkitError(f"{root}: not a checkpoint folder (expected a directory with config.json)")
        self.config = read_json_object(root / "config.json",
                                       missing="not found; a checkpoint folder needs config.json")
        self.spec: ModelSpec = read_spec(self.config, str(root / "config.json"))
        found = _index_weights(root)
        self.tensors, self.dropped = _check_against_spec(found, self.spec, root)

    @classmethod
    def open(cls, source: str | Path, *, allow_nonfinite: bool = False) -> "Checkpoint":
        return cls(resolve_source(source), allow_nonfinite=allow_nonfinite)

    @cached_property
    def repo_id(self) -> str | None:
        """The Hugging Face repo this checkpoint was downloaded from, when it was."""
        return hub_repo_id(self.root)

    @cached_property
    def weight_files(self) -> list[Path]:
        return sorted({ref.file for ref in self.tensors.values()})

    def read(self, name: str) -> torch.Tensor:
        return next(self.stream([name]))[1]

    def stream(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time in the order asked (default: embedding, layers, norm, head).
        Only one tensor is resident at once; a .bin shard stays memory-mapped while its tensors stream."""
        open_bin: tuple[Path, dict[str, torch.Tensor]] | None = None
        for name in self.tensors if names is None else names:
            ref = self.tensors[name]
            if ref.entry is not None:
                tensor = st.read_tensor(ref.file, ref.entry)
            else:
                if open_bin is None or open_bin[0] != ref.file:
                    open_bin = (ref.file, load_state_dict(ref.file))
                tensor = open_bin[1][name]
            yield name, self._checked(name, ref.file, tensor)
            del tensor  # else the generator holds the last tensor while it reads the next

    def _checked(self, name: str, file: Path, tensor: torch.Tensor) -> torch.Tensor:
        if not self.allow_nonfinite and (bad := count_nonfinite(tensor)):
            raise CpmkitError(f"{file}: tensor {name} holds {bad} NaN/Inf values; refusing to go on "
                              "(--allow-nonfinite to continue anyway)")
        return tensor


# NaN and Inf are the values whose exponent bits are all ones, i.e. whose magnitude bits (sign cleared) are at
# least the exponent mask. Testing that on an integer view needs no float upcast; numpy does it on one thread
# (torch would split each op across threads and wait on them), in chunks that bound the temporaries.
_MAGNITUDE_BITS = {torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80), torch.float16: (torch.int16, 0x7FFF, 0x7C00),
                   torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
                   torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}
_FINITE_CHUNK = 1 << 20


def count_nonfinite(tensor: torch.Tensor) -> int:
    if tensor.dtype not in _MAGNITUDE_BITS:
        return 0
    int_dtype, magnitude, exponent = _MAGNITUDE_BITS[tensor.dtype]
    bits = tensor.detach().cpu().contiguous().view(int_dtype).reshape(-1).numpy()
    bad = 0
    for i in range(0, bits.size, _FINITE_CHUNK):
        chunk = bits[i : i + _FINITE_CHUNK] & magnitude
        if chunk.size and chunk.max() >= exponent:
            bad += int((chunk >= exponent).sum())
    return bad


def _index_weights(root: Path) -> dict[str, WeightRef]:
    """Find the weight files (sharded or single, safetensors preferred over .bin) and index every tensor."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = root / index_name
        if index_path.is_file():
            weight_map = read_json_object(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CpmkitError(f"{index_path}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (root / name).is_file():
                    raise CpmkitError(f"{index_path}: names shard {name}, which is missing")
            found = _index_files([root / f for f in files])
            for name, file in weight_map.items():
                if name not in found or found[name].file.name != file:
                    raise CpmkitError(f"{index_path}: maps {name} to {file}, but that shard does not hold it")
            return found
    files = sorted(root.glob("model*.safetensors")) or sorted(root.glob("pytorch_model*.bin"))
    if not files:
        raise CpmkitError(f"{root}: no weights found (model.safetensors, model-*-of-*.safetensors with an index, "
                          "or pytorch_model*.bin)")
    return _index_files(files)


def _index_files(files: list[Path]) -> dict[str, WeightRef]:
    found: dict[str, WeightRef] = {}
    for file in files:
        if file.suffix == ".bin":
            refs = {n: WeightRef(file, tuple(t.shape), t.dtype, None) for n, t in load_state_dict(file).items()}
        else:
            entries, _ = st.read_header(file)
            refs = {n: WeightRef(file, e.shape, e.dtype, e) for n, e in entries.items()}
        for name, ref in refs.items():
            if name in found:
                raise CpmkitError(f"{file}: tensor {name} is also in {found[name].file.name}")
            found[name] = ref
    return found


def _check_against_spec(found: dict[str, WeightRef], spec: ModelSpec,
                        root: Path) -> tuple[dict[str, WeightRef], list[str]]:
    expected = spec.tensor_shapes()
    used, dropped = {}, []
    for name, ref in found.items():
        if name in expected:
            if ref.shape != expected[name]:
                raise CpmkitError(f"{ref.file}: tensor {name} has shape {list(ref.shape)} but config.json "
                                  f"implies {list(expected[name])}")
            used[name] = ref
        elif name.endswith(DROPPED_TENSOR_SUFFIXES) or (name == "lm_head.weight" and spec.tie_word_embeddings):
            dropped.append(name)
        else:
            raise CpmkitError(f"{ref.file}: unexpected tensor {name} for {spec.architecture} "
                              f"({spec.family.value}); the checkpoint does not match config.json")
    missing = [n for n in expected if n not in used]
    if missing:
        raise CpmkitError(f"{root}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    # keep the config's order (embedding, layers, norm, head) for streaming and writing
    return {n: used[n] for n in expected}, dropped
