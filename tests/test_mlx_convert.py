"""MLX conversion end to end: cpmkit writes a folder, real mlx-lm (CPU) loads it with strict weights and runs it,
and cpmkit's reader runs the same folder through the reference model with the same quantized weights.

Logits are compared in float32 on both sides (a folder's bf16 tensors are exact in float32; the mlx model
is cast to float32 after loading): same top-1 at every position and max |a - b| / max |b| <= REL_TOL.
Packed weights are checked against mx.quantize of the source tensor, bit for bit, through mx.load.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.mlx.convert import convert_to_mlx
from cpmkit.convert.mlx.load import load_mlx_model
from cpmkit.errors import CpmkitError
from cpmkit.formats import safetensors
from cpmkit.formats.mlx import folder as mlx_folder
from cpmkit.spec import read_spec
from cpmkit.testing import build_checkpoint, longrope_factors

mx = pytest.importorskip("mlx.core")
mlx_nn = pytest.importorskip("mlx.nn")
mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
mlx_lm_convert = pytest.importorskip("mlx_lm.convert")

REL_TOL = 1e-4  # measured 2e-7 .. 2e-6 (float32 on both sides, same quantized weights)
SEQ = 20
# ModelArgs fields cpmkit leaves to mlx-lm's default, because that default is what MiniCPM means.
DEFAULT_OK = {"rope_traditional": False, "attention_bias": False, "mlp_bias": False, "layer_types": None,
              "sliding_window": None}
SMALL_ORIGINAL_MAX = 8  # LongRoPE config whose original context is shorter than SEQ


def _small_original_max() -> dict:
    factors = longrope_factors(32)
    return {"rope_scaling": {"rope_type": "longrope", "long_factor": factors, "short_factor": factors,
                             "original_max_position_embeddings": SMALL_ORIGINAL_MAX}}


# (id, fixture variant, config overrides, convert options); MiniCPM3-4B ships .bin shards, MiniCPM4-8B
# sharded safetensors: the fixtures use those layouts (layout key of the overrides).
CASES = [
    ("minicpm4-untied-sharded", "minicpm4", {"layout": "sharded"}, {}),
    ("minicpm4-tied", "minicpm4-0.5b", {}, {}),
    ("minicpm4-short-original", "minicpm4", _small_original_max(), {}),
    ("minicpm-2b-style", "minicpm-2b", {}, {}),
    ("minicpm-2b-128k-dynamic", "minicpm-2b-128k", {}, {}),
    ("minicpm3-bin", "minicpm3", {"layout": "bin"}, {}),
    ("minicpm5-tied", "minicpm5", {"tie_word_embeddings": True}, {}),
    ("minicpm5-untied", "minicpm5", {}, {}),
    ("bitcpm4", "bitcpm4", {}, {}),
    ("minicpm4-tied-q8g32", "minicpm4-0.5b", {}, {"bits": 8, "group_size": 32}),
    ("minicpm4-tied-mixed46", "minicpm4-0.5b", {}, {"recipe": "mixed_4_6"}),
    ("minicpm4-tied-bf16", "minicpm4-0.5b", {}, {"quantize": False, "dtype": "bfloat16"}),
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    built = {}

    def get(variant: str, overrides: dict) -> Path:
        key = (variant, json.dumps(overrides, sort_keys=True))
        if key not in built:
            config = {k: v for k, v in overrides.items() if k != "layout"}
            built[key] = build_checkpoint(root / f"{variant}-{len(built)}", variant, config_overrides=config,
                                          layout=overrides.get("layout", "safetensors"))
        return built[key]

    return get


def _ids(vocab: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(7).integers(0, vocab, size=(batch, SEQ))


def _mlx_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    model, _ = mlx_lm_utils.load_model(folder, strict=True)
    model.set_dtype(mx.float32)
    return np.array(model(mx.array(ids)).astype(mx.float32))


def _cpmkit_logits(folder: Path, ids: np.ndarray, model=None) -> np.ndarray:
    model = model or load_mlx_model(folder)[0]
    with torch.no_grad():
        return model(torch.from_numpy(ids)).numpy()


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= REL_TOL, rel


def _to_mx(t: torch.Tensor):
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


@pytest.mark.parametrize("variant,overrides,options", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mlx_lm_runs_the_folder_like_cpmkit(sources, tmp_path, variant, overrides, options):
    ck = Checkpoint.open(sources(variant, overrides))
    folder = convert_to_mlx(ck, tmp_path / "mlx", **{"dtype": "float32", **options})
    config = json.loads((folder / "config.json").read_text())
    assert list(config) == sorted(config)
    if ck.spec.family.value in ("minicpm", "minicpm3"):
        assert config["tie_word_embeddings"] is False
        assert "lm_head.weight" in mlx_folder.index_tensors(folder)
    assert config["model_type"] == ck.spec.family.value
    _check_model_args_explicit(config)
    reader, runtime = load_mlx_model(folder)
    assert runtime == _as_mlx_lm_runs(ck.spec, config["torch_dtype"])  # the folder means what the checkpoint means
    ids = _ids(ck.spec.vocab_size)
    _assert_close(_cpmkit_logits(folder, ids, reader), _mlx_logits(folder, ids))


def _as_mlx_lm_runs(spec, dtype_name: str):
    """The checkpoint's spec with the changes the conversion makes on purpose: MiniCPM heads untied, and
    mlx-lm's runtime choices (LongRoPE long factors only, MLA latent-norm eps 1e-5)."""
    spec = dataclasses.replace(spec, torch_dtype=dtype_name,
                               tie_word_embeddings=spec.tie_word_embeddings and spec.family.value == "llama")
    if spec.rope.long_factor is not None:
        spec = dataclasses.replace(spec, rope=dataclasses.replace(spec.rope, short_factor=spec.rope.long_factor))
    if spec.mla is not None:
        spec = dataclasses.replace(spec, mla=dataclasses.replace(spec.mla, latent_norm_eps=1e-5))
    return spec


def _check_model_args_explicit(config: dict) -> None:
    """Every field of the family's mlx-lm ModelArgs is written, unless its default is what we mean."""
    import importlib

    args_class = importlib.import_module(f"mlx_lm.models.{config['model_type']}").ModelArgs
    for field in dataclasses.fields(args_class):
        if field.name in DEFAULT_OK:
            assert field.default == DEFAULT_OK[field.name], field.name
        else:
            assert field.name in config, field.name


def test_longrope_mlx_uses_long_factors_where_reference_agrees(sources, tmp_path):
    """mlx-lm always rotates with long_factor; the HF-semantics reference uses short_factor until T passes
    original_max_position_embeddings. On a folder whose factors differ (as mlx_lm.convert would write one)
    the reader follows mlx-lm at every length, the HF reference only past the original context; cpmkit
    refuses to write such a folder."""
    factors = longrope_factors(32)
    folder = convert_to_mlx(Checkpoint.open(sources("minicpm4", _small_original_max())), tmp_path / "mlx",
                            dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"]["short_factor"] = [f / 2 for f in factors]
    (folder / "config.json").write_text(json.dumps(config))
    reader, runtime_spec = load_mlx_model(folder)
    assert runtime_spec.rope.short_factor == runtime_spec.rope.long_factor == tuple(factors)
    hf_spec = dataclasses.replace(runtime_spec, rope=read_spec(config).rope)
    for length in (SEQ, SMALL_ORIGINAL_MAX - 2):
        ids = _ids(1000)[:, :length]
        mlx_out = _mlx_logits(folder, ids)
        with torch.no_grad():
            _assert_close(reader(torch.from_numpy(ids)).numpy(), mlx_out)
            reader.spec = hf_spec
            hf_out = reader(torch.from_numpy(ids)).numpy()
            reader.spec = runtime_spec
        if length > SMALL_ORIGINAL_MAX:
            _assert_close(hf_out, mlx_out)
        else:
            assert np.abs(hf_out - mlx_out).max() / np.abs(mlx_out).max() > 1e-2

    bad = sources("minicpm4", {"rope_scaling": {**config["rope_scaling"], "type": "longrope"}})
    with pytest.raises(CpmkitError, match="long_factor") as err:
        convert_to_mlx(Checkpoint.open(bad), tmp_path / "refused")
    assert "\n" not in str(err.value) and not (tmp_path / "refused").exists()


def test_packed_tensors_equal_mx_quantize(sources, tmp_path, monkeypatch):
    """Every stored tensor is mx.quantize (or a plain cast) of the source tensor, bit for bit; a tied
    MiniCPM head is the embedding quantized on its own. Small row blocks make every tensor cross blocks."""
    monkeypatch.setattr("cpmkit.convert.mlx.convert.BLOCK_ELEMENTS", 1000)
    ck = Checkpoint.open(sources("minicpm3", {}))
    for options in ({}, {"recipe": "mixed_3_6", "dtype": "float16"}):
        folder = convert_to_mlx(ck, tmp_path / f"mlx{len(options)}", **options)
        config = json.loads((folder / "config.json").read_text())
        stored = {}
        for file in folder.glob("model*.safetensors"):
            stored.update(mx.load(str(file)))
        quant = config["quantization"]
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[config["torch_dtype"]]
        assert dtype == (torch.float16 if options else torch.bfloat16)
        for name, tensor in ck.stream():
            targets = [name] + (["lm_head.weight"] if name == "model.embed_tokens.weight" else [])
            for target in targets:
                module = target.removesuffix(".weight")
                source = _to_mx(tensor.to(dtype))
                if f"{module}.scales" not in stored:
                    assert tensor.dim() == 1 and mx.array_equal(stored[target], source).item(), target
                    continue
                entry = quant.get(module, quant)
                expected = mx.quantize(source, group_size=entry["group_size"], bits=entry["bits"])
                for part, want in zip(("weight", "scales", "biases"), expected):
                    got = stored[f"{module}.{part}"]
                    assert got.dtype == want.dtype and mx.array_equal(got, want).item(), f"{module}.{part}"


def test_mixed_recipe_layers_load_with_mlx_lm_bits(sources, tmp_path):
    """The per-layer entries make mlx-lm build every layer with the bits its own mixed_4_6 predicate picks
    for that path; MLA's kv_a_proj_with_mqa and kv_b_proj count as v_a_proj / v_b_proj (substring match)."""
    ck = Checkpoint.open(sources("minicpm3", {"num_hidden_layers": 3}))
    plain = convert_to_mlx(ck, tmp_path / "float", quantize=False)
    mixed = convert_to_mlx(ck, tmp_path / "mixed", recipe="mixed_4_6")
    float_model, _ = mlx_lm_utils.load_model(plain)
    predicate = mlx_lm_convert.mixed_quant_predicate_builder("mixed_4_6", float_model, 64)
    expected = {path: predicate(path, m)["bits"] for path, m in float_model.named_modules()
                if isinstance(m, (mlx_nn.Linear, mlx_nn.Embedding))}
    loaded, _ = mlx_lm_utils.load_model(mixed)
    got = {path: m.bits for path, m in loaded.named_modules()
           if isinstance(m, (mlx_nn.QuantizedLinear, mlx_nn.QuantizedEmbedding))}
    assert got == expected
    assert got["model.layers.2.self_attn.kv_b_proj"] == got["model.layers.2.self_attn.kv_a_proj_with_mqa"] == 6
    quant = json.loads((mixed / "config.json").read_text())["quantization"]
    assert {k: quant[k] for k in ("group_size", "bits", "mode")} == {"group_size": 64, "bits": 4, "mode": "affine"}
    entries = {k: v for k, v in quant.items() if isinstance(v, dict)}
    assert entries and all(v == {"group_size": 64, "bits": 6, "mode": "affine"} for v in entries.values())
    assert set(entries) == {p for p, b in expected.items() if b == 6}
    _assert_close(_cpmkit_logits(mixed, _ids(1000)), _mlx_logits(mixed, _ids(1000)))


def test_reader_loads_mlx_lm_convert_output(sources, tmp_path):
    """Folders written by mlx_lm.convert: bytes equal cpmkit's for the default recipe; the reader follows
    mlx-lm's config defaults (MiniCPM-2B without rope_theta runs at 1e6 there) and its tied llama head
    (the quantized embedding used as a linear)."""
    for variant, overrides in (("minicpm-2b", {"model_type": "minicpm"}), ("minicpm5", {"tie_word_embeddings": True})):
        src = sources(variant, overrides)
        theirs = tmp_path / f"{variant}-mlx-lm"
        mlx_lm_convert.convert(str(src), str(theirs), quantize=True, dtype="float32")
        ours = convert_to_mlx(Checkpoint.open(src), tmp_path / f"{variant}-cpmkit", dtype="float32")
        a, b = mx.load(str(theirs / "model.safetensors")), mx.load(str(ours / "model.safetensors"))
        assert set(a) == set(b)
        assert all(a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item() for k in a)
        index_a, index_b = (json.loads((f / mlx_folder.INDEX_NAME).read_text()) for f in (theirs, ours))
        assert index_a == index_b
        ids = _ids(900)
        _assert_close(_cpmkit_logits(theirs, ids), _mlx_logits(theirs, ids))
        _, spec = load_mlx_model(theirs)
        assert spec.rope.theta == (1e6 if variant == "minicpm-2b" else 5e6)


def test_sharded_folder_loads(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(mlx_folder, "MAX_SHARD_BYTES", 300_000)
    folder = convert_to_mlx(Checkpoint.open(sources("minicpm4", {})), tmp_path / "mlx", dtype="float32")
    files = sorted(p.name for p in folder.glob("model*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((folder / mlx_folder.INDEX_NAME).read_text())
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    assert set(index["weight_map"].values()) == set(files)
    sizes = [(folder / f).stat().st_size for f in files]
    assert index["metadata"]["total_size"] < sum(sizes) < index["metadata"]["total_size"] + 4096 * len(files)
    ids = _ids(1000)
    _assert_close(_cpmkit_logits(folder, ids), _mlx_logits(folder, ids))


def test_folder_files_and_card(sources, tmp_path):
    src = sources("minicpm5", {"tie_word_embeddings": True})
    (src / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# MiniCPM5\n")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "top_p": 0.8}))
    folder = convert_to_mlx(Checkpoint.open(src), tmp_path / "minicpm5-mlx")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).read_bytes() == (src / name).read_bytes()
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mlx\n") and "- mlx\n" in card and "license: apache-2.0\n" in card
    assert "mlx_lm.generate --model minicpm5-mlx" in card
    header = mlx_folder.index_tensors(folder)["model.norm.weight"]
    assert safetensors.read_header(header.file)[1] == {"format": "mlx"}
    from mlx_lm import generate, load

    model, tokenizer = load(str(folder))  # the full mlx-lm path, tokenizer included
    assert isinstance(generate(model, tokenizer, prompt="hello", max_tokens=3), str)

    longrope = convert_to_mlx(Checkpoint.open(sources("minicpm4", {})), tmp_path / "minicpm4-mlx")
    assert 'tokenizer_config={"config": PretrainedConfig()}' in (longrope / "README.md").read_text()


def test_output_is_atomic(sources, tmp_path):
    ck = Checkpoint.open(sources("minicpm4", {}))
    out = tmp_path / "mlx"

    def failing(jobs):
        for i, job in enumerate(jobs):
            if i == 5:
                raise OSError("disk full")
            yield job

    with pytest.raises(CpmkitError, match="disk full; nothing was left behind"):
        convert_to_mlx(ck, out, progress=failing)
    assert list(tmp_path.iterdir()) == []

    convert_to_mlx(ck, out, bits=8)
    with pytest.raises(CpmkitError, match="already exists"):
        convert_to_mlx(ck, out)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    convert_to_mlx(ck, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


@pytest.mark.parametrize("variant,match", [("minicpm-s", "fatrelu"), ("minicpm-moe", "mixture-of-experts")])
def test_refused_in_one_line(sources, tmp_path, variant, match):
    with pytest.raises(CpmkitError, match=match) as err:
        convert_to_mlx(Checkpoint.open(sources(variant, {})), tmp_path / "mlx")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "mlx").exists()


def test_bad_options_refused(sources, tmp_path):
    ck = Checkpoint.open(sources("minicpm4", {}))
    for options, match in (({"dtype": "float64"}, "float16, bfloat16, float32"), ({"bits": 7}, "bits=7"),
                           ({"recipe": "mixed_9_9"}, "mixed_4_6"), ({"recipe": "mixed_4_6", "quantize": False},
                                                                    "needs quantization")):
        with pytest.raises(CpmkitError, match=match):
            convert_to_mlx(ck, tmp_path / "mlx", **options)
    assert not (tmp_path / "mlx").exists()
