"""cpmkit's GGUF quantizers against llama.cpp's own C quantizer (ggml_quantize_chunk in
llama-cpp-python's libggml-base): K-quants with and without an importance matrix, the 32-block types
with one. Bytes must be identical block for block."""

import pytest
import torch
from gguf import GGMLQuantizationType as QType

pytest.importorskip("llama_cpp")
from ggml_reference import ggml_quantize  # noqa: E402

from cpmkit.convert.gguf.quantize import dequantize_tensor, quantize_tensor  # noqa: E402
from cpmkit.formats.gguf.layout import BLOCKS  # noqa: E402

K_QUANTS = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K]
IMATRIX_LEGACY = [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1]


def weights(cols: int, rows: int = 12, seed: int = 0) -> torch.Tensor:
    """Gaussian rows at different scales plus the rows that stress the searches."""
    g = torch.Generator().manual_seed(seed * 7919 + cols)
    w = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g)) * 0.02
    w[0] = 0.0
    w[1] = -w[1].abs()  # all negative
    w[2, cols // 2] = 25.0  # one huge outlier
    w[3] = torch.distributions.StudentT(2.0).sample((cols,)) * 0.01  # heavy tails
    w[4] = torch.round(w[4] * 200) / 200  # few distinct values, many ties
    w[5] = w[5].abs() + 0.01  # all positive
    w[6] = -1.0 + 1e-4 * w[6]  # nearly constant
    w[7, :256] = 1e-20 * torch.sign(w[7, :256])  # below GROUP_MAX_EPS (one block: subnormals are slow)
    return w


def imatrices(cols: int):
    g = torch.Generator().manual_seed(cols)
    dense = torch.rand(cols, generator=g) * 3 + 0.01
    sparse = torch.where(torch.rand(cols, generator=g) < 0.1, torch.rand(cols, generator=g) * 10, 0.0)
    return {"dense": dense, "sparse": sparse}  # sparse: most columns never activated


def assert_identical_to_llama(w: torch.Tensor, qtype: QType, imatrix: torch.Tensor | None):
    ours, ref = quantize_tensor(w, qtype, imatrix), ggml_quantize(w, qtype, imatrix)
    size = BLOCKS[qtype].type_size
    same = (ours.reshape(-1, size) == ref.reshape(-1, size)).all(1)
    assert same.all(), f"{qtype.name}: {same.float().mean().item():.4%} of {same.numel()} blocks identical"
    shape = tuple(w.shape)
    rmse = lambda raw: (dequantize_tensor(raw, qtype, shape) - w).pow(2).mean().sqrt()  # noqa: E731
    assert rmse(ours) <= rmse(ref)


@pytest.mark.parametrize("cols", [1536, 2304, 4096])
@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_k_quants_without_imatrix(qtype, cols):
    assert_identical_to_llama(weights(cols), qtype, None)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("cols", [1536, 2304])
@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_k_quants_with_imatrix(qtype, cols, kind):
    assert_identical_to_llama(weights(cols, seed=1), qtype, imatrices(cols)[kind])


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("cols", [2304, 5760])
@pytest.mark.parametrize("qtype", IMATRIX_LEGACY, ids=lambda q: q.name)
def test_32_blocks_with_imatrix(qtype, cols, kind):
    assert_identical_to_llama(weights(cols, seed=2), qtype, imatrices(cols)[kind])


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.Q5_1, QType.TQ1_0, QType.TQ2_0, QType.BF16,
                                   QType.F16], ids=lambda q: q.name)
def test_reference_types_match_llama(qtype):
    assert_identical_to_llama(weights(4096, seed=3), qtype, None)


def test_many_rows_of_one_real_shape():
    """A MiniCPM5-1B-shaped slice of two row chunks, so chunking over rows is exercised too."""
    w = weights(1536, rows=200, seed=4)
    for qtype in (QType.Q4_K, QType.Q6_K):
        assert_identical_to_llama(w, qtype, None)
