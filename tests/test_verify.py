"""cpmkit verify: an MLX folder and a GGUF file of a tiny checkpoint scored against the reference, the
reference scored once for both (disk cache), the speed section, and JSON / Markdown / HTML that agree."""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import cpmkit.verify.run as run
from cpmkit.checkpoint import Checkpoint
from cpmkit.cli import cli
from cpmkit.convert.gguf.convert import convert_to_gguf
from cpmkit.convert.mlx.convert import convert_to_mlx
from cpmkit.errors import CpmkitError
from cpmkit.testing import build_checkpoint
from cpmkit.verify.evaluate import evaluate_text
from cpmkit.verify.report import KernelPath, read_report
from cpmkit.verify.speed import BATCHES

CTX, CHUNKS = 64, 3
WORDS = ("the king and queen of a small town went to see the sea where ships of every colour sailed in the "
         "morning light while old men sang songs about bread wine and the long winter").split()


def sample_text(n_words: int = 900, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    ck_dir = build_checkpoint(root / "ck", "minicpm4-0.5b")
    ck = Checkpoint.open(ck_dir)
    text = root / "text.txt"
    text.write_text(sample_text())
    return SimpleNamespace(
        root=root, ck=ck_dir, text=text,
        mlx4=convert_to_mlx(ck, root / "mlx4", bits=4), mlx8=convert_to_mlx(ck, root / "mlx8", bits=8, group_size=32),
        q4_0=convert_to_gguf(ck, root / "model-Q4_0.gguf", file_type="Q4_0"))


def _verify(a, artifact, cache_dir, **options):
    return run.verify_artifact(artifact, a.ck, text=a.text, ctx=CTX, chunks=CHUNKS, cache_dir=cache_dir,
                               speed=options.pop("speed", False), **options)


def test_reference_is_scored_once_for_many_artifacts(artifacts, tmp_path, monkeypatch):
    calls = []
    real = run.checkpoint_source
    monkeypatch.setattr(run, "checkpoint_source", lambda *a, **k: calls.append(1) or real(*a, **k))
    mlx4, name4 = _verify(artifacts, artifacts.mlx4, tmp_path)
    assert len(calls) == 1
    mlx8, name8 = _verify(artifacts, artifacts.mlx8, tmp_path)
    gguf, name_gguf = _verify(artifacts, artifacts.q4_0, tmp_path)
    assert len(calls) == 1, "the second and third verify must read the cached reference log-probs"
    assert (name4, name8, name_gguf) == ("mlx:4bit-g64", "mlx:8bit-g32", "gguf:Q4_0")
    assert mlx4.reference_metrics == mlx8.reference_metrics == gguf.reference_metrics

    # the cached reference is the reference: its perplexity is `cpmkit eval`'s
    expected = evaluate_text(Checkpoint.open(artifacts.ck), artifacts.text.read_text(), ctx=CTX, max_chunks=CHUNKS)
    assert mlx4.reference_metrics.ppl == pytest.approx(expected.ppl, rel=1e-9)
    assert mlx4.evaluation.scored_tokens == expected.n_tokens == CHUNKS * (CTX - CTX // 2 - 1)

    a4, a8, q = mlx4.artifact(name4), mlx8.artifact(name8), gguf.artifact(name_gguf)
    for a in (a4, a8, q):
        assert a.top1_agreement > 0.9 and abs(a.delta_ppl_pct) < 5 and 0 < a.kld.mean <= a.kld.p99 <= a.kld.max
        assert a.kld_histogram.total == mlx4.evaluation.scored_tokens
    assert a8.kld.mean < a4.kld.mean / 10, "8-bit group-32 must diverge far less than 4-bit"
    # 4 or 8 bits plus a bf16 scale and bias per group; the MLX folders also hold an untied copy of the head
    assert 4.5 < a4.bits_per_weight < 5.5 and 9 < a8.bits_per_weight < 10.5 and 4.5 < q.bits_per_weight < 5.5
    assert q.file_size_bytes == artifacts.q4_0.stat().st_size
    assert q.path == "model-Q4_0.gguf"  # outside the report's folder: named by the file


def test_speed_section(artifacts, tmp_path):
    report, name = _verify(artifacts, artifacts.q4_0, tmp_path, speed=True)
    speed = report.artifact(name).speed
    assert speed.device.kernel_path is KernelPath.TORCH and "dequantize + matmul on every call" in speed.device.name
    shapes = {(lin.shape, lin.weight_type) for lin in speed.linears}
    # Q4_0 file of a 2-layer model: q/o 256x256, k/v 128x256, gate/up 768x256, down 256x768, tied head 1005x256
    assert {s for s, _ in shapes} == {(256, 256), (128, 256), (768, 256), (256, 768), (1005, 256)}
    assert sorted(lin.batch for lin in speed.linears) == sorted(BATCHES * len(shapes))
    e2e = speed.end_to_end
    assert e2e.prefill_tokens == CTX and e2e.decode_tokens >= 4
    assert min(e2e.prefill_tok_s, e2e.decode_tok_s, e2e.bf16_prefill_tok_s, e2e.bf16_decode_tok_s) > 0


def _md_row(md: str, name: str) -> list[str]:
    fmt, variant = name.split(":")
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [fmt, variant]:
            return cells
    raise AssertionError(f"no row for {name} in report.md")


def test_cli_json_markdown_and_html_agree(artifacts, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["verify", str(artifacts.mlx4), "--reference", str(artifacts.ck), "--text",
                                      str(artifacts.text), "--ctx", str(CTX), "--chunks", str(CHUNKS), "--no-speed",
                                      "--json", "--report", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # stdout is exactly one JSON object
    stored = json.loads((out / "report.json").read_text())
    assert printed == stored
    report = read_report(out / "report.json")
    a = report.artifacts[0]
    assert a.path == "mlx4"

    cells = _md_row((out / "report.md").read_text(), a.name)
    ppl, unc = (float(x) for x in cells[4].split("±"))
    assert (ppl, unc) == (round(a.ppl, 3), round(a.ppl_uncertainty, 3))
    assert float(cells[3]) == round(a.bits_per_weight, 2)
    assert float(cells[5]) == round(a.delta_ppl_pct, 2)
    assert (float(cells[6]), float(cells[7])) == (round(a.kld.mean, 6), round(a.kld.p99, 6))
    assert float(cells[8]) == round(100 * a.top1_agreement, 2)

    page = (out / "report.html").read_text()
    row = re.search(rf'<tr data-row="{re.escape(a.name)}".*?</tr>', page, re.S).group(0)
    shown = dict(re.findall(r'data-field="([^"]+)" data-value="([^"]+)"', row))
    for field, value in {"ppl": a.ppl, "delta_ppl_pct": a.delta_ppl_pct, "kld.mean": a.kld.mean,
                         "kld.p99": a.kld.p99, "top1_agreement": a.top1_agreement,
                         "bits_per_weight": a.bits_per_weight, "file_size_bytes": a.file_size_bytes}.items():
        assert json.loads(shown[field]) == value, field


def test_not_an_artifact(artifacts, tmp_path):
    with pytest.raises(CpmkitError, match="pass it as --reference"):
        run.verify_artifact(artifacts.ck, artifacts.ck, text=artifacts.text, cache_dir=tmp_path)
    stray = tmp_path / "notes.txt"
    stray.write_text("hello")
    result = CliRunner().invoke(cli, ["verify", str(stray), "--reference", str(artifacts.ck)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "not an artifact cpmkit can read" in result.output


def test_artifact_path_in_report(tmp_path):
    inside = tmp_path / "shelf" / "model.gguf"
    assert run.path_in_report(inside, tmp_path) == "shelf/model.gguf"
    assert run.path_in_report(inside, tmp_path / "elsewhere") == "model.gguf"


def test_bf16_activations_as_on_cuda(artifacts, tmp_path, monkeypatch):
    """On CUDA verify runs bf16 activations: the same pipeline in bf16 (here on CPU) scores the reference and an
    artifact close to the float32 scoring, under its own cache key."""
    import torch

    from cpmkit.verify.setup import score_dtype

    assert score_dtype(torch.device("cpu")) == torch.float32 and score_dtype(torch.device("cuda")) == torch.bfloat16
    f32, name = _verify(artifacts, artifacts.mlx8, tmp_path)
    monkeypatch.setattr(run, "score_dtype", lambda device: torch.bfloat16)
    bf16, _ = _verify(artifacts, artifacts.mlx8, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2, "bf16 and float32 scores are cached apart"
    assert bf16.reference_metrics.ppl == pytest.approx(f32.reference_metrics.ppl, rel=0.02)
    assert bf16.artifact(name).top1_agreement > 0.9 and bf16.artifact(name).kld.mean < 0.01
