"""``cpmkit release``: a model's shelf of quantized artifacts, each verified against the BF16 reference and held
to its quality gates, in Hugging Face hub layout.

OUTDIR gets one folder per artifact, named as its Hub repo (``<name>-Q4_K_M-GGUF``, ``<name>-4bit-g64-MLX``:
the format plug-in's ``folder_name``), holding

* the artifact (a GGUF file; a folder artifact's files at the top, as mlx-lm loads a repo), and any file its
  conversion wrote beside it (a computed importance matrix),
* ``README.md``: the model card (front matter with base_model, base_model_relation: quantized, license,
  tags, quantized_by; the verification table; how to run it; how to remake it),
* ``SHA256SUMS`` of those files (``sha256sum -c`` format),
* ``verify.json``: the verification report of this artifact (schema cpmkit.verify),
* ``cpmkit-release.json``: what made the artifact (target, format options, source weights' SHA-256,
  cpmkit version) and its files' checksums, which a re-run compares to skip the work,

and, for the whole shelf, ``manifest.json`` (every artifact: folder, files with sha256 and size, options,
verification summary, gate), ``report.json``, ``report.md`` and ``report.html``.

Quality gates (``--max-kld``, ``--max-delta-ppl``, or per target in a recipe): an artifact that misses its
budget is marked failed in the report and the manifest and is not pushed; the release finishes the other
artifacts and then raises :class:`GateFailure`.

Each folder is written under a temporary name and renamed when complete, so a killed run leaves only
complete folders; a re-run skips every folder whose record matches and whose files still have their
checksums, and reuses its stored verification when it was measured on the same reference, tokens and
device. Folders of an earlier release into OUTDIR whose targets are not in this one are refused (named),
unless ``prune`` removes them, so the folders and the manifest always agree. All artifacts share one
reference pass (:class:`cpmkit.verify.run.Verifier`). Converters are deterministic, so the same
checkpoint, options and cpmkit version give byte-identical artifacts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from cpmkit import __version__
from cpmkit.atomic import atomic_dir, atomic_file, remove_partials
from cpmkit.checkpoint import DEMO_NAME, Checkpoint, is_hub_id
from cpmkit.convert.plugin import ConvertContext, Location, Target
from cpmkit.convert.registry import FORMATS
from cpmkit.errors import CpmkitError
from cpmkit.formats.hf_folder import card_front_matter
from cpmkit.release.card import CardFacts, model_card
from cpmkit.release.hub import HubDestination, check_push, upload_folder
from cpmkit.release.recipe import Gates, ReleaseOptions, ShelfTarget, release_options
from cpmkit.verify.report import (
    Artifact,
    Gate,
    Report,
    merge_reports,
    read_report,
    write_report,
)
from cpmkit.verify.run import (
    EvalText,
    ProgressFactory,
    Verifier,
    no_progress,
    write_report_files,
)

SIDECAR = "cpmkit-release.json"
SIDECAR_SCHEMA = "cpmkit.release-artifact/2"
MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "cpmkit.release/2"
VERIFY_FILE = "verify.json"
CHECKSUMS = "SHA256SUMS"
CARD = "README.md"
OWN_FILES = (SIDECAR, VERIFY_FILE, CHECKSUMS, CARD)  # written by the release, not by the conversion
REPORTS = ("report.json", "report.md", "report.html")
DEMO_MODEL_NAME = "cpmkit-demo"
HASH_CHUNK = 1 << 24
STAGING = "artifact"  # a folder artifact's own folder inside the release folder, emptied into it
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class FolderStatus(str, Enum):
    BUILT = "built"
    REUSED = "reused"  # found complete from an earlier run: nothing recomputed
    REVERIFIED = "reverified"  # artifact kept, verification redone (other text, windows or device)


@dataclass(frozen=True)
class ReleasedArtifact:
    name: str  # format:variant
    folder: Path
    status: FolderStatus
    passed: bool  # met its quality gates
    repo_id: str | None  # where it was pushed


@dataclass(frozen=True)
class ReleaseResult:
    outdir: Path
    report: Report
    artifacts: tuple[ReleasedArtifact, ...]

    @property
    def html(self) -> Path:
        return self.outdir / "report.html"

    @property
    def failed(self) -> list[ReleasedArtifact]:
        return [a for a in self.artifacts if not a.passed]


class GateFailure(CpmkitError):
    """Raised after a release in which some artifacts missed their quality gates; ``result`` is the release."""

    def __init__(self, result: ReleaseResult):
        self.result = result
        names = ", ".join(a.name for a in result.failed)
        super().__init__(f"{result.outdir}: {len(result.failed)} of {len(result.artifacts)} artifacts missed their "
                         f"quality gates and were not pushed: {names} (see {result.html})")


def release(source: str | Path, outdir: str | Path, *, targets: tuple[str, ...] = (), recipe: str | Path | None = None,
            name: str | None = None, base_model: str | None = None, text: str | Path | None = None,
            dataset: str | None = None, ctx: int | None = None, chunks: int | None = None, device: str | None = None,
            speed: bool | None = None, cache_dir: str | Path | None = None, push: str | None = None,
            max_kld: float | None = None, max_delta_ppl: float | None = None, prune: bool = False,
            progress: ProgressFactory = no_progress, log: Callable[[str], None] = lambda line: None) -> ReleaseResult:
    """Convert the checkpoint ``source`` (folder, Hub repo id or ``demo``) to every target (``--to`` specs
    such as ``gguf:Q4_K_M`` or ``mlx:4bit-g64``, after those of ``recipe``, a TOML file or a built-in recipe
    name), verify each against the reference, hold it to its gates, and write the shelf into ``outdir``.
    Options left None come from the recipe, else their defaults (ctx 512, speed on, device auto, no gates).
    ``push``: ``ORG`` or ``ORG/NAME``; checked (client, token, network) before anything is written, then
    every artifact folder that passed its gates is uploaded to ``ORG/<folder name>``. ``prune`` removes
    folders of earlier releases into ``outdir`` that this one does not make. ``log`` gets one line per stage
    and artifact. Returns what was done; raises GateFailure (after writing everything) when an artifact
    missed its gates, CpmkitError with one line for any other problem."""
    options = release_options(targets, recipe, name=name, base_model=base_model, text=text, dataset=dataset, ctx=ctx,
                              chunks=chunks, device=device, speed=speed, max_kld=max_kld, max_delta_ppl=max_delta_ppl)
    hub = check_push(push) if push is not None else None  # before OUTDIR is touched
    ck = Checkpoint.open(source)
    for item in options.targets:
        reason = FORMATS[item.target.format].why_not(ck.spec, item.target)
        if reason:
            raise CpmkitError(f"{ck.root}: cannot make {item.target.name}: {reason}")
    model_name = _model_name(source, ck, options, hub)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise CpmkitError(f"{outdir}: exists and is not a folder")
    folders = [_folder_name(item.target, model_name) for item in options.targets]
    _check_stale(outdir, folders, prune, log)
    verifier = Verifier(ck, str(source), EvalText.load(options.text, options.dataset), ctx=options.ctx,
                        chunks=options.chunks, device=options.device, cache_dir=cache_dir, progress=progress)
    facts = CardFacts(ck.spec.family.value, options.base_model or _base_model(source, ck), _license(ck))
    outdir.mkdir(parents=True, exist_ok=True)
    remove_partials(outdir, [*folders, MANIFEST, *REPORTS])

    maker = ArtifactFolders(ck, verifier, facts, outdir, model_name, str(source), options.speed, hub, progress, log)
    shelf: Report | None = None
    done, entries = [], []
    for item in options.targets:
        start = time.perf_counter()
        status, report, record = maker.make(item)
        artifact = report.artifacts[0]
        in_shelf = dataclasses.replace(report, artifacts=(_shelf_artifact(artifact, record["folder"]),))
        shelf = in_shelf if shelf is None else merge_reports(shelf, in_shelf)
        entries.append(_manifest_entry(record, artifact))
        done.append((item, status, outdir / record["folder"], artifact.gate is None or artifact.gate.passed))
        verdict = "" if done[-1][3] else f"  FAILED its gates: {'; '.join(artifact.gate.misses)}"
        log(f"{item.target.name}: {status.value} in {time.perf_counter() - start:.1f} s, mean KLD "
            f"{artifact.kld.mean:.6f}, ΔPPL {artifact.delta_ppl_pct:+.2f} %{verdict}")

    _write_shelf(outdir, shelf, model_name, entries)
    released = []
    for item, status, folder, passed in done:
        repo_id = f"{hub.org}/{folder.name}" if hub and passed else None
        if repo_id:
            upload_folder(hub, folder, repo_id, f"cpmkit {__version__}: {item.target.name}")
        released.append(ReleasedArtifact(item.target.name, folder, status, passed, repo_id))
    result = ReleaseResult(outdir, shelf, tuple(released))
    if result.failed:
        raise GateFailure(result)
    return result


def _folder_name(target: Target, model_name: str) -> str:
    return FORMATS[target.format].folder_name(target, model_name)


def _check_stale(outdir: Path, folders: list[str], prune: bool, log: Callable[[str], None]) -> None:
    """Folders an earlier ``cpmkit release`` wrote into ``outdir`` for targets this one does not make: removed
    with ``prune``, else refused, so the folders and the manifest always agree."""
    if not outdir.is_dir():
        return
    stale = sorted(p.name for p in outdir.iterdir() if p.is_dir() and p.name not in folders
                   and (p / SIDECAR).is_file())
    if not stale:
        return
    if not prune:
        raise CpmkitError(f"{outdir}: holds artifact folders this release does not make ({', '.join(stale)}); "
                          "release into another OUTDIR, or pass --prune to remove them")
    for name in stale:
        shutil.rmtree(outdir / name)
        log(f"removed {outdir / name} (not a target of this release)")


class ArtifactFolders:
    """Makes the shelf's artifact folders, or finds them already made."""

    def __init__(self, ck: Checkpoint, verifier: Verifier, facts: CardFacts, outdir: Path, model_name: str,
                 source: str, speed: bool, hub: HubDestination | None, progress: ProgressFactory,
                 log: Callable[[str], None]):
        self.ck, self.verifier, self.facts, self.outdir = ck, verifier, facts, outdir
        self.model_name, self.source, self.speed, self.hub = model_name, source, speed, hub
        self.progress, self.log = progress, log

    def identity(self, target: Target) -> dict[str, Any]:
        """Everything the artifact's bytes depend on."""
        return {"schema": SIDECAR_SCHEMA, "cpmkit_version": __version__, "target": target.name,
                "options": target.options_json(), "model_name": self.model_name,
                "source_sha256": self.verifier.reference.content_sha256}

    def make(self, item: ShelfTarget) -> tuple[FolderStatus, Report, dict[str, Any]]:
        """(status, this artifact's report with its in-folder path, its record)."""
        target = item.target
        folder = self.outdir / _folder_name(target, self.model_name)
        record = _read_record(folder)
        if folder.exists() and record is None:
            raise CpmkitError(f"{folder}: exists but was not written by cpmkit release (no {SIDECAR}); move it away "
                              "or choose another OUTDIR")
        if record is not None and _is_intact(folder, record, self.identity(target)):
            stored = self._stored_report(folder, target)
            if stored is not None:
                report = _gated(stored, item.gates)
                if report != stored:
                    write_report(report, folder / VERIFY_FILE)
                self._write_card(folder, target, report, record, only_if_changed=True)
                return FolderStatus.REUSED, report, record
            report = _gated(self._verify(folder / record["artifact"], target), item.gates)
            write_report(report, folder / VERIFY_FILE)
            self._write_card(folder, target, report, record)
            return FolderStatus.REVERIFIED, report, record
        with atomic_dir(folder, overwrite=True) as stage:
            artifact = self._convert(target, stage)
            files = [_file_entry(stage, f) for f in sorted(stage.rglob("*")) if f.is_file()]
            record = {**self.identity(target), "folder": folder.name, "artifact": _relative(artifact, stage),
                      "files": files}
            report = _gated(self._verify(artifact, target), item.gates)
            write_report(report, stage / VERIFY_FILE)
            (stage / CHECKSUMS).write_text("".join(f"{f['sha256']}  {f['path']}\n" for f in files))
            (stage / SIDECAR).write_text(json.dumps(record, indent=2) + "\n")
            self._write_card(stage, target, report, record)
        return FolderStatus.BUILT, report, record

    def _convert(self, target: Target, stage: Path) -> Path:
        """The artifact written into ``stage``: a file artifact under its own name, a folder artifact's files
        at the top of ``stage``."""
        plugin = FORMATS[target.format]
        context = ConvertContext(overwrite=False, progress=self.progress(f"{target.name}: converting", "tensor"),
                                 device=self.verifier.device.type, log=self.log)
        if not plugin.folder_artifact:
            return plugin.convert(self.ck, target, stage / plugin.artifact_name(target, self.model_name), context)
        staged = plugin.convert(self.ck, target, stage / STAGING, context)
        for item in sorted(staged.iterdir()):
            if item.name != CARD:  # the release writes its own card
                os.replace(item, stage / item.name)
        shutil.rmtree(staged)
        return stage

    def _verify(self, artifact: Path, target: Target) -> Report:
        in_folder = _relative(artifact, artifact if artifact.is_dir() else artifact.parent)
        measured = self.verifier.measure(artifact, report_path=in_folder, variant=target.variant, speed=self.speed)
        return self.verifier.empty_report().with_artifact(measured)

    def _stored_report(self, folder: Path, target: Target) -> Report | None:
        """The folder's verification when it was measured as this run would measure it."""
        try:
            report = read_report(folder / VERIFY_FILE)
        except CpmkitError:
            return None
        v = self.verifier
        same = (report.cpmkit_version == __version__ and report.reference == v.reference
                and report.evaluation == v.evaluation and report.device == v.scoring_device
                and report.names == [target.name])
        return report if same and (not self.speed or report.artifacts[0].speed is not None) else None

    def _write_card(self, folder: Path, target: Target, report: Report, record: dict[str, Any], *,
                    only_if_changed: bool = False) -> None:
        repo_id = f"{self.hub.org}/{record['folder']}" if self.hub else f"<org>/{record['folder']}"
        where = Location(repo_id, record["artifact"])
        config = _artifact_config(folder / record["artifact"])
        remake = f"cpmkit release {self.source} OUTDIR --to {target.name} --name {self.model_name}"
        card = model_card(target, record["folder"], report, record["files"], where, self.facts, config, remake)
        path = folder / CARD
        if only_if_changed and path.is_file() and path.read_text(encoding="utf-8") == card:
            return
        with atomic_file(path, overwrite=True) as tmp:
            tmp.write_text(card, encoding="utf-8")


def _gated(report: Report, gates: Gates) -> Report:
    """The one-artifact report with its gate verdict (none when the target has no gates)."""
    artifact = report.artifacts[0]
    gate = None
    if gates != Gates():
        misses = gates.misses(artifact.kld.mean, artifact.delta_ppl_pct)
        gate = Gate(gates.max_kld, gates.max_delta_ppl, not misses, tuple(misses))
    return dataclasses.replace(report, artifacts=(dataclasses.replace(artifact, gate=gate),))


# ---- records and checksums -------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _file_entry(folder: Path, path: Path) -> dict[str, Any]:
    return {"path": _relative(path, folder), "sha256": sha256_file(path), "size_bytes": path.stat().st_size}


def _relative(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix() or "."


def _read_record(folder: Path) -> dict[str, Any] | None:
    path = folder / SIDECAR
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}  # ours, but damaged: rebuilt
    return record if isinstance(record, dict) else {}


def _is_intact(folder: Path, record: dict[str, Any], identity: dict[str, Any]) -> bool:
    """The record describes this target from this source, and every file it lists still has its checksum."""
    if any(record.get(k) != v for k, v in identity.items()) or not isinstance(record.get("files"), list):
        return False
    if not (folder / CHECKSUMS).is_file() or not (folder / record.get("artifact", "\0")).exists():
        return False
    for f in record["files"]:
        path = folder / f["path"]
        if not path.is_file() or path.stat().st_size != f["size_bytes"] or sha256_file(path) != f["sha256"]:
            return False
    return True


def _artifact_config(artifact: Path) -> dict[str, Any]:
    config = artifact / "config.json"
    return json.loads(config.read_text(encoding="utf-8")) if artifact.is_dir() and config.is_file() else {}


# ---- the shelf -------------------------------------------------------------------------------------------

def _shelf_artifact(artifact: Artifact, folder: str) -> Artifact:
    path = folder if artifact.path == "." else f"{folder}/{artifact.path}"
    return dataclasses.replace(artifact, path=path)


def _manifest_entry(record: dict[str, Any], artifact: Artifact) -> dict[str, Any]:
    return {
        "name": artifact.name, "folder": record["folder"], "artifact": record["artifact"],
        "files": record["files"], "options": record["options"],
        "verify": {"ppl": artifact.ppl, "delta_ppl_pct": artifact.delta_ppl_pct, "kld_mean": artifact.kld.mean,
                   "kld_p99": artifact.kld.p99, "kld_max": artifact.kld.max,
                   "top1_agreement": artifact.top1_agreement, "bits_per_weight": artifact.bits_per_weight,
                   "file_size_bytes": artifact.file_size_bytes},
        "gate": None if artifact.gate is None else {
            "max_kld": artifact.gate.max_kld, "max_delta_ppl": artifact.gate.max_delta_ppl,
            "passed": artifact.gate.passed, "misses": list(artifact.gate.misses)},
    }


def _write_shelf(outdir: Path, report: Report, model_name: str, entries: list[dict[str, Any]]) -> None:
    """report.json/.md/.html, then manifest.json last: its presence means the shelf is complete."""
    write_report_files(report, outdir)
    ref, ev = report.reference, report.evaluation
    manifest = {
        "schema": MANIFEST_SCHEMA, "cpmkit_version": __version__, "name": model_name,
        "reference": {"source": ref.source, "architecture": ref.architecture, "content_sha256": ref.content_sha256,
                      "ppl": report.reference_metrics.ppl},
        "evaluation": {"text_source": ev.text_source, "text_sha256": ev.text_sha256, "ctx": ev.ctx,
                       "windows": ev.windows},
        "report": "report.json",
        "artifacts": entries,
    }
    with atomic_file(outdir / MANIFEST, overwrite=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


# ---- names and card facts --------------------------------------------------------------------------------

def _model_name(source: str | Path, ck: Checkpoint, options: ReleaseOptions, hub: HubDestination | None) -> str:
    """--name, else the recipe's, else --push's NAME, else the repo's name, else the folder's."""
    if options.name:
        name = options.name
    elif hub and hub.name:
        name = hub.name
    elif str(source) == DEMO_NAME and not Path(source).exists():
        name = DEMO_MODEL_NAME
    elif is_hub_id(source):
        name = str(source).rpartition("/")[2]
    elif ck.repo_id:
        name = ck.repo_id.rpartition("/")[2]
    else:
        name = ck.root.resolve().name
    if not _NAME.fullmatch(name):
        raise CpmkitError(f"release name {name!r}: use letters, digits, '.', '_' and '-' (it names folders and "
                          "Hub repos); pass --name")
    return name


def _base_model(source: str | Path, ck: Checkpoint) -> str | None:
    """The Hub repo the checkpoint came from: the source itself, or the cache snapshot it was read from."""
    return str(source) if is_hub_id(source) else ck.repo_id


def _license(ck: Checkpoint) -> dict[str, str]:
    keys = card_front_matter(ck.root)
    if not keys and isinstance(ck.config.get("license"), str):
        keys = {"license": ck.config["license"]}
    return keys
