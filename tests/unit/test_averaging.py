import pytest
import torch
from torch import nn

from stages.models.averaging import average_checkpoints, average_state_dicts


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(2, 2).half())


def test_average_of_two_checkpoints(tmp_path):
    torch.manual_seed(0)
    a, b = _net(), _net()
    a[1].num_batches_tracked.fill_(7)
    b[1].num_batches_tracked.fill_(11)
    pa, pb = tmp_path / "epoch_1.pt", tmp_path / "epoch_2.pt"
    torch.save(a.state_dict(), pa)
    torch.save({"model": b.state_dict(), "epoch": 2}, pb)  # training-style checkpoint
    avg = average_checkpoints([pa, pb])
    sa, sb = a.state_dict(), b.state_dict()
    assert list(avg) == list(sb)
    for k in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        assert torch.allclose(avg[k], (sa[k] + sb[k]) / 2)
    assert avg["2.weight"].dtype == torch.float16
    mean_half = ((sa["2.weight"].double() + sb["2.weight"].double()) / 2).float()
    assert torch.allclose(avg["2.weight"].float(), mean_half,
                          atol=1e-3)
    assert avg["1.num_batches_tracked"].item() == 11
    assert avg["1.num_batches_tracked"].dtype == torch.int64
    net = _net()
    net.load_state_dict(avg)


def test_average_of_three_exact_values():
    sds = [{"w": torch.tensor([float(i)]), "n": torch.tensor(i)} for i in (1, 2, 6)]
    out = average_state_dicts(sds)
    assert out["w"].item() == 3.0 and out["n"].item() == 6


def test_mismatched_keys_and_shapes_rejected():
    with pytest.raises(ValueError, match="different keys"):
        average_state_dicts([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="shape"):
        average_state_dicts([{"a": torch.zeros(1)}, {"a": torch.zeros(2)}])
    with pytest.raises(ValueError):
        average_checkpoints([])
