"""cpmkit release: hub-layout folders with cards and checksums, byte-identical re-runs, a killed run that
resumes without redoing finished artifacts, --push refused before anything is written, recipes and bad
target specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from test_verify import sample_text

from cpmkit.cli import cli
from cpmkit.errors import CpmkitError
from cpmkit.release.recipe import BUILTIN_RECIPES, release_options
from cpmkit.release.shelf import CHECKSUMS, SIDECAR, GateFailure, release, sha256_file
from cpmkit.testing import build_checkpoint
from cpmkit.verify.report import read_report

TARGETS = ("mlx:4", "gguf:Q4_0")
FOLDERS = ("MiniCPM4-0.5B-4bit-g64-MLX", "MiniCPM4-0.5B-Q4_0-GGUF")
OPTIONS = {"ctx": 64, "chunks": 2, "speed": False}
KILL_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def shelf(tmp_path_factory):
    """One uninterrupted release, the yardstick of the other tests."""
    root = tmp_path_factory.mktemp("release")
    # laid out as a Hugging Face cache snapshot, so the cards name the repo it came from
    ck = build_checkpoint(root / "models--openbmb--MiniCPM4-0.5B" / "snapshots" / "0123abc", "minicpm4-0.5b")
    text = root / "text.txt"
    text.write_text(sample_text())
    cache = root / "cache"
    result = release(ck, root / "a", targets=TARGETS, text=text, cache_dir=cache, **OPTIONS)
    return SimpleNamespace(root=root, ck=ck, text=text, cache=cache, result=result, out=root / "a")


def _cli_args(s, outdir: Path) -> list[str]:
    args = ["release", str(s.ck), str(outdir), "--text", str(s.text), "--ctx", "64", "--chunks", "2", "--no-speed",
            "--cache-dir", str(s.cache)]
    return args + [a for t in TARGETS for a in ("--to", t)]


def _checksums(out: Path) -> dict[str, str]:
    return {f: (out / f / CHECKSUMS).read_text() for f in FOLDERS}


def _front_matter(card: str) -> dict[str, object]:
    """The card's YAML front matter, read as the flat key: value / key: list-of-items YAML it is."""
    assert card.startswith("---\n")
    block = card[4 : card.index("\n---\n", 4)]
    out: dict[str, object] = {}
    key = None
    for line in block.splitlines():
        if line.startswith("- "):
            out[key].append(line[2:])
        else:
            key, _, value = line.partition(": ")
            key = key.rstrip(":")
            out[key] = value if value else []
    return out


def test_layout_cards_and_manifest(shelf):
    out = shelf.out
    assert [a.status for a in shelf.result.artifacts] == ["built", "built"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["folder"] for a in manifest["artifacts"]] == list(FOLDERS)
    for entry in manifest["artifacts"]:
        folder = out / entry["folder"]
        listed = {f["path"]: f for f in entry["files"]}
        sums = dict(reversed(line.split("  ")) for line in (folder / CHECKSUMS).read_text().splitlines())
        assert set(sums) == set(listed)
        for path, f in listed.items():
            assert sha256_file(folder / path) == f["sha256"] == sums[path]
            assert (folder / path).stat().st_size == f["size_bytes"]
        card = _front_matter((folder / "README.md").read_text())
        fmt = entry["name"].split(":")[0]
        assert card["base_model"] == "openbmb/MiniCPM4-0.5B" and card["base_model_relation"] == "quantized"
        assert card["quantized_by"] == "cpmkit"
        assert {fmt, "minicpm", "quantized", entry["name"].split(":")[1]} <= set(card["tags"])
        own = read_report(folder / "verify.json")
        assert own.names == [entry["name"]] and own.artifacts[0].ppl == entry["verify"]["ppl"]
    assert (out / "MiniCPM4-0.5B-Q4_0-GGUF" / "MiniCPM4-0.5B-Q4_0.gguf").is_file() and (out / "MiniCPM4-0.5B-4bit-g64-MLX" / "config.json").is_file()
    report = read_report(out / "report.json")
    assert report.names == ["mlx:4bit-g64", "gguf:Q4_0"]
    assert [a.path for a in report.artifacts] == ["MiniCPM4-0.5B-4bit-g64-MLX", "MiniCPM4-0.5B-Q4_0-GGUF/MiniCPM4-0.5B-Q4_0.gguf"]
    md = (out / "report.md").read_text()
    for a in report.artifacts:
        assert f"| {a.format} | {a.variant} |" in md and f"{a.delta_ppl_pct:+.2f}" in md
    assert not list(out.glob(".*"))  # no temporary leftovers


def test_release_twice_is_byte_identical(shelf):
    again = release(shelf.ck, shelf.root / "b", targets=TARGETS, text=shelf.text, cache_dir=shelf.cache, **OPTIONS)
    assert _checksums(shelf.out) == _checksums(again.outdir)
    assert (shelf.out / "manifest.json").read_bytes() == (again.outdir / "manifest.json").read_bytes()


def test_killed_release_resumes(shelf):
    out = shelf.root / "killed"
    proc = subprocess.Popen([sys.executable, "-c", "from cpmkit.cli import main; main()", *_cli_args(shelf, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / FOLDERS[0]
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the first artifact never appeared"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not (out / FOLDERS[1]).exists() and not (out / "manifest.json").exists(), "killed too late to test resuming"
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.iterdir()}

    resumed = release(shelf.ck, out, targets=TARGETS, text=shelf.text, cache_dir=shelf.cache, **OPTIONS)
    assert [a.status for a in resumed.artifacts] == ["reused", "built"]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.iterdir()} == kept
    assert _checksums(out) == _checksums(shelf.out)
    assert not list(out.glob(".*.partial"))


def test_changed_options_rebuild_only_what_changed(shelf):
    out = shelf.root / "changed"
    release(shelf.ck, out, targets=TARGETS[:1], text=shelf.text, cache_dir=shelf.cache, **OPTIONS)
    record = out / FOLDERS[0] / SIDECAR
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "options": {**data["options"], "group_size": 32}}))
    again = release(shelf.ck, out, targets=TARGETS[:1], text=shelf.text, cache_dir=shelf.cache,
                    **{**OPTIONS, "chunks": 1})
    assert [a.status for a in again.artifacts] == ["built"]
    third = release(shelf.ck, out, targets=TARGETS[:1], text=shelf.text, cache_dir=shelf.cache, **OPTIONS)
    assert [a.status for a in third.artifacts] == ["reverified"]  # same artifact, other windows


def test_push_without_hub_writes_nothing(shelf, tmp_path):
    out = tmp_path / "pushed"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", "from cpmkit.cli import main; main()", *_cli_args(shelf, out),
                           "--push", "me/demo"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "--push" in proc.stderr and proc.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("spec, message", [
    ("gguf:Q9_K", "gguf:Q9_K: GGUF file type 'Q9_K' is not supported; supported: F32"),
    ("mlx:7", "bits=7 is not supported"),
    ("safetensors:Q4", "unknown format 'safetensors'; expected FORMAT[:VARIANT]"),
])
def test_bad_target_spec(shelf, tmp_path, spec, message):
    result = CliRunner().invoke(cli, ["release", str(shelf.ck), str(tmp_path / "out"), "--to", spec])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and message in result.output and spec in result.output
    assert not (tmp_path / "out").exists()


def test_recipes(tmp_path):
    recipe = tmp_path / "release.toml"
    recipe.write_text('targets = ["gguf:Q8_0", "mlx:4"]\n[model]\nname = "tiny"\n'
                      '[verify]\nctx = 128\ntext = "eval.txt"\nspeed = false\n')
    options = release_options(("mlx:4bit-g64", "gguf:q2_k"), recipe, ctx=256)
    assert [t.target.name for t in options.targets] == ["gguf:Q8_0", "mlx:4bit-g64", "gguf:Q2_K"]
    assert (options.ctx, options.name, options.speed, options.text) == (256, "tiny", False, tmp_path / "eval.txt")
    recipe.write_text('targets = ["gguf:Q8_0"]\n[verify]\ncontext = 128\n')
    with pytest.raises(CpmkitError, match="unknown key verify.context"):
        release_options((), recipe)
    demo = release_options((), "demo")
    assert demo.targets and BUILTIN_RECIPES["demo"].is_file()
    assert {"gguf:Q8_0", "gguf:Q4_K_M", "gguf:Q4_0", "gguf:Q2_K", "mlx:8bit-g32", "mlx:4bit-g64",
            "mlx:mixed_4_6-g64"} <= {t.target.name for t in demo.targets}


def test_quality_gates_fail_the_release_but_finish_the_shelf(shelf, tmp_path):
    recipe = tmp_path / "gates.toml"
    recipe.write_text('targets = ["gguf:Q8_0", { to = "gguf:Q2_K", max_kld = 0.001 }]\n[gates]\nmax_delta_ppl = 50\n')
    with pytest.raises(GateFailure) as failure:
        release(shelf.ck, tmp_path / "out", recipe=recipe, text=shelf.text, cache_dir=shelf.cache, **OPTIONS)
    result = failure.value.result
    assert [(a.name, a.passed, a.repo_id) for a in result.artifacts] == [("gguf:Q8_0", True, None),
                                                                          ("gguf:Q2_K", False, None)]
    assert "1 of 2 artifacts missed their quality gates and were not pushed: gguf:Q2_K" in str(failure.value)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    gates = [a["gate"] for a in manifest["artifacts"]]
    assert gates[0] == {"max_kld": None, "max_delta_ppl": 50.0, "passed": True, "misses": []}
    assert gates[1]["passed"] is False and gates[1]["misses"][0].startswith("mean KLD ")
    report = read_report(tmp_path / "out" / "report.json")
    assert [a.gate.passed for a in report.artifacts] == [True, False]
    assert "FAILED: mean KLD" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "MiniCPM4-0.5B-Q2_K-GGUF" / "verify.json").is_file()  # kept, to be looked at

    # the CLI: every artifact listed, the failure on the last line, exit status 1; a looser gate passes
    args = ["release", str(shelf.ck), str(tmp_path / "out"), "--recipe", str(recipe), "--text", str(shelf.text),
            "--ctx", "64", "--chunks", "2", "--no-speed", "--cache-dir", str(shelf.cache)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "FAILED gates" in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ") and "gguf:Q2_K" in result.stderr
    recipe.write_text('targets = ["gguf:Q8_0", { to = "gguf:Q2_K", max_kld = 5.0 }]\n')
    assert CliRunner().invoke(cli, args).exit_code == 0


def test_stale_folders_are_refused_or_pruned(shelf, tmp_path):
    out = tmp_path / "out"
    release(shelf.ck, out, targets=("gguf:Q8_0", "gguf:Q4_0"), text=shelf.text, cache_dir=shelf.cache, **OPTIONS)
    with pytest.raises(CpmkitError, match="holds artifact folders this release does not make "
                                          r"\(MiniCPM4-0.5B-Q4_0-GGUF\).*--prune"):
        release(shelf.ck, out, targets=("gguf:Q8_0",), text=shelf.text, cache_dir=shelf.cache, **OPTIONS)
    assert (out / "MiniCPM4-0.5B-Q4_0-GGUF").is_dir()
    release(shelf.ck, out, targets=("gguf:Q8_0",), text=shelf.text, cache_dir=shelf.cache, prune=True, **OPTIONS)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["MiniCPM4-0.5B-Q8_0-GGUF"]
    assert [a["folder"] for a in json.loads((out / "manifest.json").read_text())["artifacts"]] == \
        ["MiniCPM4-0.5B-Q8_0-GGUF"]
