"""The contract every registered format plug-in keeps, run over the registry: a new format gets these tests by
registering. Convert a fixture to the plug-in's contract variant; detect it (and no other plug-in claims it);
describe and inspect it; load it into cpmkit's model with logits close to the reference forward; release it and
release it again (the second run reuses the folder); and refuse unknown or inapplicable options in one line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from test_verify import sample_text

from cpmkit.checkpoint import Checkpoint
from cpmkit.cli import cli
from cpmkit.convert.plugin import ConvertContext, LoadOptions, parse_target
from cpmkit.convert.registry import FORMATS, artifact_plugin
from cpmkit.errors import CpmkitError
from cpmkit.models.reference import load_reference
from cpmkit.release.shelf import MANIFEST, FolderStatus, release
from cpmkit.testing import build_checkpoint

PLUGINS = list(FORMATS.values())


FIXTURE_NAMES = {"minicpm4-0.5b": "MiniCPM4-0.5B", "bitcpm4": "BitCPM4-0.5B"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each plug-in's contract fixture (BitCPM's ternary weights for the ternary pack), built once."""
    root = tmp_path_factory.mktemp("contract")
    return {variant: build_checkpoint(root / FIXTURE_NAMES[variant], variant)
            for variant in sorted({p.contract_checkpoint for p in PLUGINS})}


@pytest.fixture
def checkpoint(plugin, checkpoints):
    return checkpoints[plugin.contract_checkpoint]


@pytest.fixture(scope="module")
def artifacts(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for plugin in PLUGINS:
        ck = Checkpoint.open(checkpoints[plugin.contract_checkpoint])
        target = parse_target(f"{plugin.name}:{plugin.contract_variant}", plugin.contract_options)
        out[plugin.name] = (target, plugin.convert(ck, target, root / f"{plugin.name}-out", ConvertContext()))
    return out


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_detect_describe_inspect(plugin, artifacts, checkpoint):
    target, path = artifacts[plugin.name]
    assert path.exists() and path.is_dir() == plugin.folder_artifact
    assert artifact_plugin(path) is plugin
    assert [p.name for p in PLUGINS if p.detect(path)] == [plugin.name], "exactly one plug-in claims it"
    assert not plugin.detect(checkpoint), "a plain checkpoint is not an artifact"
    d = plugin.describe(path)
    assert (d.format, d.variant, d.name) == (plugin.name, target.variant, target.name)
    assert d.files and all(f.is_file() for f in d.files) and 0 < d.tensor_bytes <= d.file_size_bytes
    info = plugin.inspect(path)
    assert (info["format"], info["variant"]) == (plugin.name, target.variant)
    json.dumps(info)
    assert plugin.format_inspect(info).strip()
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["variant"] == target.variant


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_loads_close_to_the_reference(plugin, artifacts, checkpoint):
    target, path = artifacts[plugin.name]
    ck = Checkpoint.open(checkpoint)
    model = plugin.open(path, ck.spec, LoadOptions()).load()
    reference = load_reference(ck)
    ids = torch.randint(0, ck.spec.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = reference(ids).log_softmax(-1), model(ids).log_softmax(-1)
    kld = (ref.exp() * (ref - got)).sum(-1)
    assert float(kld.mean()) < plugin.contract_max_kld
    assert float((ref.argmax(-1) == got.argmax(-1)).double().mean()) > 0.95


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_release_round_trip(plugin, checkpoint, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(sample_text())
    recipe = tmp_path / "recipe.toml"
    table = ", ".join([f'to = "{plugin.name}:{plugin.contract_variant}"',
                       *(f"{k} = {json.dumps(v)}" for k, v in plugin.contract_options.items())])
    recipe.write_text(f"targets = [{{ {table} }}]\n")
    options = dict(recipe=recipe, text=text, ctx=64, chunks=2, speed=False, cache_dir=tmp_path / "cache")
    first = release(checkpoint, tmp_path / "shelf", **options)
    (made,) = first.artifacts
    assert made.status is FolderStatus.BUILT and made.passed
    assert made.folder.name == plugin.folder_name(parse_target(made.name, plugin.contract_options), checkpoint.name)
    manifest = json.loads((tmp_path / "shelf" / MANIFEST).read_text())
    assert [a["name"] for a in manifest["artifacts"]] == [made.name]
    assert artifact_plugin(made.folder / manifest["artifacts"][0]["artifact"]) is plugin
    again = release(checkpoint, tmp_path / "shelf", **options)
    assert again.artifacts[0].status is FolderStatus.REUSED


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_unknown_and_inapplicable_options_are_refused(plugin, checkpoint, tmp_path):
    with pytest.raises(CpmkitError, match=f"--to {plugin.name}:not-a-variant: "):
        parse_target(f"{plugin.name}:not-a-variant")
    with pytest.raises(CpmkitError, match=r"--frobnicate does not apply to .* \(no format takes it\)"):
        parse_target(plugin.name, {"frobnicate": 1})
    others = {o.name: o for p in PLUGINS if p is not plugin for o in p.options
              if o.name not in {mine.name for mine in plugin.options}}
    for option in others.values():
        takers = ", ".join(p.name for p in PLUGINS if any(o.name == option.name for o in p.options))
        with pytest.raises(CpmkitError, match=f"{option.flag} does not apply to {plugin.name} "
                                              f"\\(it is an option of {takers}\\)"):
            parse_target(plugin.name, {option.name: True if option.kind is bool else "x"})
        args = [option.flag] if option.kind is bool else [option.flag, (option.choices or ("1",))[0]]
        result = CliRunner().invoke(cli, ["convert", str(checkpoint), str(tmp_path / "out"), "--to", plugin.name,
                                          *args])
        assert result.exit_code == 1 and f"{option.flag} does not apply to {plugin.name}" in result.stderr
        assert not (tmp_path / "out").exists()
