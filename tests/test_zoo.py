"""The model zoo: building by name, argument checks, and numpy state exchange."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

from fedbus import zoo
from fedbus.quant import ActFakeQuant, QATLinear
from fedbus.zoo import (
    ARCHITECTURES,
    MAX_PARAMETERS,
    build_model,
    get_state,
    input_shape,
    set_state,
    state_shapes,
)

torch.set_num_threads(1)

CASES: list[tuple[str, dict[str, Any], tuple[int, ...], int]] = [
    ("mlp", {"in_features": 64, "num_classes": 10}, (64,), 10),
    ("mlp", {"in_features": 5, "hidden": [], "num_classes": 3, "qat": False}, (5,), 3),
    ("mlp", {"in_features": 12, "hidden": [16, 8], "num_classes": 2}, (12,), 2),
    ("cnn", {"in_channels": 1, "height": 8, "width": 8, "num_classes": 10}, (1, 8, 8), 10),
    ("cnn", {"in_channels": 3, "height": 28, "width": 20, "num_classes": 4,
             "channels": [4, 6, 8]}, (3, 28, 20), 4),
    ("cnn1d", {"in_channels": 6, "length": 100, "num_classes": 4}, (6, 100), 4),
    ("cnn1d", {"in_channels": 3, "length": 4, "num_classes": 2, "channels": [5, 7],
               "qat": False}, (3, 4), 2),
]


def test_architectures_listed() -> None:
    assert sorted(ARCHITECTURES) == ["cnn", "cnn1d", "mlp"]


@pytest.mark.parametrize(("arch", "args", "shape", "classes"), CASES)
def test_each_arch_builds_and_runs(
    arch: str, args: dict[str, Any], shape: tuple[int, ...], classes: int
) -> None:
    torch.manual_seed(0)
    model = build_model(arch, args)
    assert input_shape(arch, args) == shape
    out = model.train()(torch.randn(5, *shape))
    assert out.shape == (5, classes) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.eval()(torch.randn(2, *shape)).shape == (2, classes)
    qat = args.get("qat", True)
    assert all(m.qat_enabled == qat for m in model.modules() if hasattr(m, "qat_enabled"))
    n_params = sum(p.numel() for p in model.parameters())
    assert zoo._count_parameters(arch, zoo._parse(arch, args)) == n_params


def test_mlp_layout() -> None:
    model = build_model("mlp", {"in_features": 4, "hidden": [8, 6], "num_classes": 3})
    kinds = [type(m).__name__ for m in model.children()]
    assert kinds == [
        "ActFakeQuant", "QATLinear", "ReLU", "ActFakeQuant",
        "QATLinear", "ReLU", "ActFakeQuant", "QATLinear",
    ]
    assert isinstance(next(iter(model.children())), ActFakeQuant)
    assert isinstance(list(model.children())[-1], QATLinear)


@pytest.mark.parametrize(
    ("arch", "args", "message"),
    [
        ("resnet", {}, "unknown model architecture 'resnet'; choose one of: cnn, cnn1d, mlp"),
        ("mlp", {"in_features": 4, "num_classes": 2, "hiden": [3]},
         "unknown argument 'hiden'; valid arguments: in_features, hidden, num_classes, qat"),
        ("mlp", {"num_classes": 2}, "missing required argument 'in_features'"),
        ("mlp", {"in_features": True, "num_classes": 2}, "argument 'in_features' must be"),
        ("mlp", {"in_features": 4.0, "num_classes": 2}, "argument 'in_features' must be"),
        ("mlp", {"in_features": 0, "num_classes": 2}, "argument 'in_features' must be"),
        ("mlp", {"in_features": 4, "num_classes": 2, "hidden": ["8"]}, "argument 'hidden'"),
        ("mlp", {"in_features": 4, "num_classes": 2, "hidden": 8}, "argument 'hidden'"),
        ("mlp", {"in_features": 4, "num_classes": 2, "qat": 1}, "argument 'qat' must be true"),
        ("cnn", {"in_channels": 1, "height": 8, "width": 8, "num_classes": 2, "channels": []},
         "argument 'channels' must be a list"),
        ("cnn", {"in_channels": 1, "height": 3, "width": 8, "num_classes": 2},
         "height and width must be at least 4"),
        ("cnn1d", {"in_channels": 1, "length": 7, "num_classes": 2, "channels": [2, 2, 2]},
         "length must be at least 8"),
        ("mlp", {"in_features": 100_000, "hidden": [1000], "num_classes": 2},
         f"more than the limit of {MAX_PARAMETERS:,}"),
        ("mlp", ["in_features"], "arguments must be a map"),
    ],
)
def test_bad_arch_or_args(arch: str, args: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        build_model(arch, args)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError):
        input_shape(arch, args)


def test_init_is_deterministic_given_seed() -> None:
    args = {"in_channels": 2, "height": 8, "width": 8, "num_classes": 3}
    torch.manual_seed(7)
    a = get_state(build_model("cnn", args))
    torch.manual_seed(7)
    b = get_state(build_model("cnn", args))
    torch.manual_seed(8)
    c = get_state(build_model("cnn", args))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv0.weight"], c["conv0.weight"])


def test_get_state_covers_params_and_ranges_as_float32_copies() -> None:
    model = build_model("mlp", {"in_features": 4, "hidden": [3], "num_classes": 2})
    model.train()(torch.randn(8, 4))
    state = get_state(model)
    assert list(state) == list(model.state_dict())
    assert list(state) == [
        "input_q.act_min", "input_q.act_max", "fc0.weight", "fc0.bias",
        "q0.act_min", "q0.act_max", "head.weight", "head.bias",
    ]
    assert all(a.dtype == np.float32 for a in state.values())
    assert state["input_q.act_min"].shape == () and state["input_q.act_min"] < 0
    assert state_shapes(model) == {k: v.shape for k, v in state.items()}
    before = model.head.weight.detach().clone()
    state["head.weight"][:] = 123.0
    assert torch.equal(model.head.weight.detach(), before)


def test_set_state_round_trip() -> None:
    args = {"in_channels": 3, "length": 16, "num_classes": 4}
    torch.manual_seed(1)
    src = build_model("cnn1d", args).train()
    src(torch.randn(10, 3, 16))  # observe activation ranges
    torch.manual_seed(2)
    dst = build_model("cnn1d", args)
    set_state(dst, get_state(src))
    x = torch.randn(6, 3, 16)
    assert torch.equal(src.eval()(x), dst.eval()(x))
    assert all(np.array_equal(v, get_state(dst)[k]) for k, v in get_state(src).items())


def test_set_state_accepts_read_only_arrays_without_warning() -> None:
    model = build_model("mlp", {"in_features": 3, "num_classes": 2})
    state = {
        k: np.frombuffer((v + 1).tobytes(), dtype=np.float32).reshape(v.shape)
        for k, v in get_state(model).items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_state(model, state)
    assert np.array_equal(get_state(model)["fc0.bias"], state["fc0.bias"])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("fc0.bias"), "missing tensor 'fc0.bias'"),
        (lambda s: s.__setitem__("extra", np.zeros(1, np.float32)), "unexpected tensor 'extra'"),
        (lambda s: s.__setitem__("fc0.weight", np.zeros((64, 4), np.float32)),
         "'fc0.weight' has shape (64, 4), the model expects (64, 3)"),
        (lambda s: s.__setitem__("q0.act_max", np.zeros(1, np.float32)), "'q0.act_max' has shape"),
        (lambda s: s["head.bias"].__setitem__(0, np.nan), "'head.bias' has non-finite"),
        (lambda s: s.__setitem__("head.bias", np.array(["a", "b"])), "non-numeric dtype"),
    ],
)
def test_set_state_is_strict_and_all_or_nothing(mutate: Any, message: str) -> None:
    model = build_model("mlp", {"in_features": 3, "num_classes": 2})
    before = get_state(model)
    state = {k: v + 1 for k, v in before.items()}
    mutate(state)
    with pytest.raises(ValueError) as info:
        set_state(model, state)
    assert message in str(info.value)
    after = get_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
