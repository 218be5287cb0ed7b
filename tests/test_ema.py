"""models/ema.py: the EMA rule, by hand."""
import pytest
import torch

from models.ema import EMA


def test_ema_rule_by_hand():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # n = 1: decay = 2/11
    assert ema.module.weight.item() == pytest.approx(1 - 2 / 11)
    ema.update(model)  # n = 2: decay = 3/12
    assert ema.module.weight.item() == pytest.approx((1 - 2 / 11) + 0.75 * (2 / 11))
    state = ema.state_dict()
    other = EMA(model)
    other.load_state_dict(state)
    assert other.num_updates == 2 and other.module.weight.item() == ema.module.weight.item()
