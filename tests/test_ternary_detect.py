import pytest
import torch

from cpmkit.checkpoint import Checkpoint
from cpmkit.inspection import scan_weights
from cpmkit.quant.ternary import TernaryGranularity, detect_ternary
from cpmkit.testing import Ternary, build_checkpoint


@pytest.mark.parametrize("granularity", list(Ternary))
def test_checkpoint_scan_reports_the_stored_granularity(tmp_path, granularity):
    ck = Checkpoint.open(build_checkpoint(tmp_path / "b", "bitcpm4", ternary=granularity))
    result = scan_weights(ck)
    assert result["ternary"] and result["granularity"] == granularity.value
    assert 0.2 < result["zero_fraction"] < 0.45


def test_dense_checkpoint_is_not_ternary(tmp_path):
    ck = Checkpoint.open(build_checkpoint(tmp_path / "d", "minicpm4"))
    result = scan_weights(ck)
    assert not result["ternary"] and result["first_non_ternary"] == "model.layers.0.self_attn.q_proj.weight"


def test_detect_single_tensor():
    trits = torch.randint(-1, 2, (8, 256)).float()
    assert detect_ternary(trits * 0.5).granularity is TernaryGranularity.TENSOR
    rows = trits * torch.linspace(0.1, 0.8, 8)[:, None]
    assert detect_ternary(rows.bfloat16()).granularity is TernaryGranularity.ROW
    groups = trits * torch.rand(8, 8, 1).expand(-1, -1, 32).reshape(8, 256)
    assert detect_ternary(groups).granularity is TernaryGranularity.GROUP32
    assert detect_ternary(torch.randn(8, 256)) is None
    almost = rows.clone()
    almost[2, 7] = almost[2].abs().max() * 1.1
    assert detect_ternary(almost) is None
