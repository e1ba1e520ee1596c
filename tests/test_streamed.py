"""The layer-streamed runner equals the whole model: every fixture family, the reference checkpoint and
quantized artifacts, hidden states in memory and on disk; the calibration API sees each linear's inputs
(MoE experts only their routed tokens) and feeds a modified block's outputs on; parts are freed."""

from __future__ import annotations

import pytest
import torch

from cpmkit.checkpoint import Checkpoint
from cpmkit.convert.plugin import ConvertContext, LoadOptions, parse_target
from cpmkit.convert.registry import FORMATS
from cpmkit.models.reference import checkpoint_source, stored_dtype
from cpmkit.models.streamed import HiddenStore, StreamedRunner
from cpmkit.testing import build_checkpoint

# Streamed and whole forwards do the same float32 operations on the same values; only the grouping of
# sequences may differ (one at a time instead of a batch), which can change the order of a reduction. Measured:
# max |Δ logit| 0 for every dense family and 9.5e-7 for MoE (logits up to 10); the bound leaves room for
# other BLAS builds. Top-1 agrees exactly.
MAX_LOGIT_DELTA = 1e-4
FAMILIES = ["minicpm-2b", "minicpm-2b-128k", "minicpm-s", "minicpm-moe", "minicpm4", "minicpm3", "minicpm5"]


def _tokens(vocab: int, n: int = 3, length: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def _assert_same(source, tokens: torch.Tensor, **runner) -> None:
    whole = source.load()
    with torch.no_grad():
        expected = whole(tokens)
    streamed = torch.cat(list(StreamedRunner(source, **runner).logits(tokens)))
    assert streamed.shape == expected.shape
    assert float((streamed - expected).abs().max()) < MAX_LOGIT_DELTA
    assert torch.equal(streamed.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("variant", FAMILIES)
def test_streamed_reference_equals_whole(tmp_path, variant):
    ck = Checkpoint.open(build_checkpoint(tmp_path / "m", variant))
    source = checkpoint_source(ck)
    assert stored_dtype(ck) == torch.bfloat16 and source.build().model.norm.weight.dtype == torch.bfloat16
    _assert_same(source, _tokens(ck.spec.vocab_size))


@pytest.mark.parametrize("variant, target", [("minicpm4", "gguf:Q4_K_M"), ("minicpm5", "gguf:Q5_0"),
                                             ("minicpm-moe", "gguf:Q4_K_M"), ("minicpm3", "mlx:4bit-g64"),
                                             ("minicpm4-0.5b", "mlx:mixed_3_6-g32")])
def test_streamed_artifact_equals_whole(tmp_path, variant, target):
    ck = Checkpoint.open(build_checkpoint(tmp_path / "m", variant))
    t = parse_target(target)
    plugin = FORMATS[t.format]
    path = plugin.convert(ck, t, tmp_path / "artifact", ConvertContext())
    source = plugin.open(path, ck.spec, LoadOptions())
    _assert_same(source, _tokens(ck.spec.vocab_size), batch=2)


def test_hidden_states_on_disk_equal_in_memory(tmp_path):
    ck = Checkpoint.open(build_checkpoint(tmp_path / "m", "minicpm4"))
    source = checkpoint_source(ck)
    tokens = _tokens(ck.spec.vocab_size)
    in_memory = list(StreamedRunner(source).logits(tokens))
    on_disk = list(StreamedRunner(source, host_budget=0).logits(tokens))
    assert all(torch.equal(a, b) for a, b in zip(in_memory, on_disk, strict=True))


def test_store_places_states_by_budget():
    shape = (1, 8, 4)
    assert HiddenStore(2, shape, torch.float32, torch.device("cpu")).where == "host"
    disk = HiddenStore(2, shape, torch.bfloat16, torch.device("cpu"), host_budget=10)
    value = torch.randn(shape).to(torch.bfloat16)
    disk.put(1, value)
    assert disk.where == "disk" and torch.equal(disk.get(1), value)
    disk.close()


def test_positions_and_batches(tmp_path):
    """Asking for the scored half gives those positions of the full logits; batches change nothing."""
    ck = Checkpoint.open(build_checkpoint(tmp_path / "m", "minicpm-1b"))
    source = checkpoint_source(ck)
    tokens = _tokens(ck.spec.vocab_size, n=5)
    full = torch.cat(list(StreamedRunner(source).logits(tokens)))
    half = torch.cat(list(StreamedRunner(source, batch=3).logits(tokens, slice(20, -1))))
    assert torch.allclose(half, full[:, 20:-1], atol=MAX_LOGIT_DELTA, rtol=0)


class _Recorder:
    """Records each linear's inputs, and zeroes one block's o_proj to show its outputs feed the next block."""

    def __init__(self, zero_block: int | None = None):
        self.seen: dict[str, int] = {}
        self.zero_block = zero_block

    def visit(self, index, block, run):
        names = [n for n, m in block.named_modules() if n and hasattr(m, "in_features")]

        def count(name):
            def hook(x):
                self.seen[f"{index}.{name}"] = self.seen.get(f"{index}.{name}", 0) + x.reshape(-1, x.shape[-1]).shape[0]
            return hook

        run({name: count(name) for name in names})
        if index == self.zero_block:
            with torch.no_grad():
                block.self_attn.o_proj.weight.zero_()


def test_calibration_hooks_see_routed_tokens_and_changes_feed_on(tmp_path):
    ck = Checkpoint.open(build_checkpoint(tmp_path / "m", "minicpm-moe"))
    source = checkpoint_source(ck)
    tokens = _tokens(ck.spec.vocab_size, n=2, length=16)
    recorder = _Recorder()
    StreamedRunner(source).calibrate(tokens, recorder)
    assert recorder.seen["0.self_attn.q_proj"] == tokens.numel() == recorder.seen["1.mlp.gate"]
    experts = [recorder.seen.get(f"0.mlp.experts.{e}.w1", 0) for e in range(ck.spec.moe.num_experts)]
    assert sum(experts) == tokens.numel() * ck.spec.moe.top_k  # each token goes to top_k experts
    assert recorder.seen.get("0.mlp.experts.0.w2") == experts[0]

    # a visitor that changes block 0 changes what block 1 sees: compare block 1's q_proj inputs
    def inputs_of_block_1(zero):
        captured = []

        class Capture(_Recorder):
            def visit(self, index, block, run):
                super().visit(index, block, run)
                if index == 1:
                    run({"self_attn.q_proj": captured.append})

        StreamedRunner(source).calibrate(tokens, Capture(zero_block=0 if zero else None))
        return torch.cat(captured)

    assert not torch.allclose(inputs_of_block_1(False), inputs_of_block_1(True))


def test_a_pass_stops_once_its_hooked_modules_have_their_inputs(tmp_path):
    ck = Checkpoint.open(build_checkpoint(tmp_path / "m", "minicpm4"))
    tokens = _tokens(ck.spec.vocab_size, n=3, length=16)
    calls: list[str] = []

    class QKVOnly:
        def visit(self, index, block, run):
            for name in ("self_attn.o_proj", "mlp.down_proj"):
                block.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
            run({"self_attn.q_proj": lambda x: calls.append("q"), "self_attn.v_proj": lambda x: calls.append("v")})
            assert calls == ["q", "v"] * 3  # every sequence reached q and v; nothing after v ran
            run.advance()
            assert calls[6:] == ["self_attn.o_proj", "mlp.down_proj"] * 3  # advancing runs the whole block
            calls.clear()

    StreamedRunner(checkpoint_source(ck)).calibrate(tokens, QKVOnly())
