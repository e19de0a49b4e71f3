"""The trainer's EMA update against the reference's rule (shadow * decay + p * (1 - decay), in fp32)."""
import pytest
import torch
import torch.nn as nn

from train.ema import EMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    # parameters of several shapes and a bf16 one (the update reads every parameter as fp32); group_size 2 below
    # splits them over several launches
    m = nn.Sequential(nn.Linear(7, 13), nn.Linear(13, 5, bias=False), nn.LayerNorm(5))
    m[1].weight.data = m[1].weight.data.bfloat16()
    return m


@pytest.mark.parametrize("decay", [0.9999, 0.9, 0.5])
def test_update_is_the_references_rule(decay):
    model = _model()
    ema = EMA(model, decay, group_size=2)
    expected = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * (step + 1))
        ema.update(model)
        for n, p in model.named_parameters():  # the authors' update, in float64 for the comparison
            expected[n] = (expected[n].double() * decay + p.detach().double() * (1 - decay)).float()
    for n, v in ema.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, expected[n], rtol=1e-6, atol=1e-6, msg=n)
        assert not torch.equal(v, dict(model.named_parameters())[n].detach().float())  # it did average


def test_decay_one_keeps_and_decay_zero_copies_bit_for_bit():
    model = _model()
    keep, copy = EMA(model, 1.0), EMA(model, 0.0)
    start = keep.state_dict()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).add_(0.25)
    keep.update(model)
    copy.update(model)
    for n, p in model.named_parameters():
        assert torch.equal(keep.shadow[n], start[n])
        assert torch.equal(copy.shadow[n], p.detach().float())


def test_state_dict_round_trip_and_a_mismatch_names_the_keys():
    model = _model()
    ema = EMA(model, 0.99)
    other = EMA(_model(), 0.99)
    with torch.no_grad():
        for v in other.shadow.values():
            v.add_(1.0)
    ema.load_state_dict(other.state_dict())
    assert all(torch.equal(ema.shadow[k], other.shadow[k]) for k in ema.shadow)
    with pytest.raises(KeyError, match="missing.*0.weight"):
        ema.load_state_dict({k: v for k, v in other.state_dict().items() if k != "0.weight"})
