"""Fake quantization on core torch ops: weight grid, activation ranges, gradients, toggling."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fedbus.quant import (
    MIN_SCALE,
    ActFakeQuant,
    QATConv1d,
    QATConv2d,
    QATLinear,
    act_qparams,
    fake_quant_weight,
    set_qat,
    weight_scale,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("shape", [(16, 32), (8, 3, 3, 3), (6, 4, 5)])
def test_weight_fake_quant_error_and_levels(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    q = fake_quant_weight(w)
    scale = weight_scale(w)
    assert scale.dtype == torch.float32 and scale.shape == (shape[0],)
    rows_w, rows_q = w.reshape(shape[0], -1), q.reshape(shape[0], -1)
    for c in range(shape[0]):
        err = (rows_w[c] - rows_q[c]).abs().max()
        assert err <= scale[c] / 2 * (1 + 1e-5)
        levels = rows_q[c] / scale[c]
        assert torch.allclose(levels, levels.round(), atol=1e-3)
        assert levels.abs().max() <= 127 + 1e-3
        assert len(torch.unique(rows_q[c])) <= 255
    # The largest magnitude in each channel sits exactly on the +-127 level.
    assert torch.allclose(rows_q.abs().amax(dim=1), rows_w.abs().amax(dim=1), rtol=1e-6)


def test_weight_fake_quant_uses_at_most_255_levels_on_dense_data() -> None:
    w = torch.linspace(-1, 1, 10_000).reshape(1, -1)
    assert len(torch.unique(fake_quant_weight(w))) == 255


def test_weight_scale_guards_degenerate_channels() -> None:
    w = torch.stack([
        torch.zeros(5),
        torch.full((5,), 1e-40),
        torch.tensor([1.0, float("inf"), 0.0, 0.0, 0.0]),
        torch.tensor([127.0, -3.0, 0.0, 1.0, 2.0]),
    ])
    scale = weight_scale(w)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert scale[0] == 1.0 and scale[2] == 1.0
    assert scale[1] == pytest.approx(MIN_SCALE)
    assert scale[3] == pytest.approx(1.0)
    q = fake_quant_weight(w)
    assert torch.equal(q[0], torch.zeros(5))
    assert torch.isfinite(q[[0, 1, 3]]).all()


def test_act_fake_quant_starts_unobserved_and_passes_through_in_eval() -> None:
    aq = ActFakeQuant().eval()
    assert aq.act_min.dtype == torch.float32 and float(aq.act_min) == float(aq.act_max) == 0.0
    assert not aq.observed
    x = torch.randn(4, 7)
    assert torch.equal(aq(x), x)
    assert not aq.observed
    assert set(aq.state_dict()) == {"act_min", "act_max"}


def test_act_ranges_first_batch_sets_then_ema_and_include_zero() -> None:
    aq = ActFakeQuant(momentum=0.01).train()
    aq(torch.tensor([0.5, 2.0, 3.0]))  # all positive: min is pinned to 0
    assert float(aq.act_min) == 0.0 and float(aq.act_max) == 3.0
    aq(torch.tensor([-1.0, 1.0]))
    assert float(aq.act_min) == pytest.approx(0.99 * 0.0 + 0.01 * -1.0)
    assert float(aq.act_max) == pytest.approx(0.99 * 3.0 + 0.01 * 1.0)
    neg = ActFakeQuant().train()
    neg(torch.tensor([-4.0, -2.0]))  # all negative: max is pinned to 0
    assert float(neg.act_min) == -4.0 and float(neg.act_max) == 0.0


def test_act_ranges_stay_finite_with_bad_batches() -> None:
    aq = ActFakeQuant().train()
    aq(torch.tensor([float("nan"), 1.0]))
    aq(torch.tensor([float("inf"), 1.0]))
    assert not aq.observed
    aq(torch.tensor([-1.0, 1.0]))
    aq(torch.tensor([float("-inf"), 1.0]))
    aq(torch.empty(0))
    assert float(aq.act_min) == -1.0 and float(aq.act_max) == 1.0


def test_act_ranges_frozen_in_eval_and_output_on_grid() -> None:
    torch.manual_seed(0)
    aq = ActFakeQuant().train()
    for _ in range(5):
        aq(torch.randn(64, 8) * 2)
    lo, hi = float(aq.act_min), float(aq.act_max)
    aq.eval()
    x = torch.randn(1000) * 3
    y = aq(x)
    assert (float(aq.act_min), float(aq.act_max)) == (lo, hi)
    scale, zero_point = act_qparams(lo, hi)
    assert 0 <= zero_point <= 255
    levels = y / scale + zero_point
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert len(torch.unique(y)) <= 256
    inside = (x >= lo + scale) & (x <= hi - scale)
    assert inside.sum() > 100
    assert ((x - y)[inside].abs() <= scale / 2 * (1 + 1e-4)).all()
    assert y.max() <= hi + scale and y.min() >= lo - scale  # clamped to the range


def test_act_qparams_degenerate_ranges() -> None:
    assert act_qparams(0.0, 0.0)[0] == pytest.approx(MIN_SCALE)
    scale, zero_point = act_qparams(-1e308, 1e308)
    assert scale == 1.0 and 0 <= zero_point <= 255
    assert act_qparams(0.0, 2.55) == (pytest.approx(0.01), 0)
    assert act_qparams(-2.55, 0.0) == (pytest.approx(0.01), 255)


@pytest.mark.parametrize(
    ("layer", "x_shape"),
    [
        (QATLinear(6, 4), (3, 6)),
        (QATConv2d(2, 4, 3, padding=1), (3, 2, 5, 5)),
        (QATConv1d(2, 4, 5, padding=2), (3, 2, 9)),
    ],
)
def test_gradients_flow_with_qat_on(layer: nn.Module, x_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ActFakeQuant(), layer, ActFakeQuant()).train()
    x = torch.randn(x_shape, requires_grad=True)
    model(x).square().sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_weight_straight_through_gradient_is_identity() -> None:
    w = torch.randn(4, 9, requires_grad=True)
    (fake_quant_weight(w) * torch.arange(36.0).reshape(4, 9)).sum().backward()
    assert torch.equal(w.grad, torch.arange(36.0).reshape(4, 9))


def test_qat_layers_match_float_when_off_and_fake_quant_when_on() -> None:
    torch.manual_seed(0)
    lin, conv2, conv1 = QATLinear(8, 5), QATConv2d(2, 3, 3), QATConv1d(2, 3, 3)
    x_lin, x_c2, x_c1 = torch.randn(4, 8), torch.randn(4, 2, 6, 6), torch.randn(4, 2, 10)
    model = nn.ModuleList([lin, conv2, conv1, ActFakeQuant()])
    assert set_qat(model, False) == 4
    assert all(not m.qat_enabled for m in model)
    assert torch.equal(lin(x_lin), nn.functional.linear(x_lin, lin.weight, lin.bias))
    assert torch.equal(conv2(x_c2), nn.functional.conv2d(x_c2, conv2.weight, conv2.bias))
    assert torch.equal(conv1(x_c1), nn.functional.conv1d(x_c1, conv1.weight, conv1.bias))
    set_qat(model, True)
    q_lin = nn.functional.linear(x_lin, fake_quant_weight(lin.weight), lin.bias)
    assert torch.equal(lin(x_lin), q_lin)
    assert not torch.equal(q_lin, nn.functional.linear(x_lin, lin.weight, lin.bias))
    q_c2 = nn.functional.conv2d(x_c2, fake_quant_weight(conv2.weight), conv2.bias)
    assert torch.equal(conv2(x_c2), q_c2)
    q_c1 = nn.functional.conv1d(x_c1, fake_quant_weight(conv1.weight), conv1.bias)
    assert torch.equal(conv1(x_c1), q_c1)


def test_act_qat_off_is_identity_but_still_observes() -> None:
    aq = ActFakeQuant(qat=False).train()
    x = torch.randn(50)
    assert torch.equal(aq(x), x)
    assert aq.observed
    set_qat(aq, True)
    assert not torch.equal(aq(x), x)


def test_no_deprecation_warnings_in_qat_forward_and_backward() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = nn.Sequential(ActFakeQuant(), QATLinear(4, 3), ActFakeQuant()).train()
        model(torch.randn(2, 4)).sum().backward()
        model.eval()(torch.randn(2, 4))
