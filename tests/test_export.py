"""int8 export: fidelity to the fake-quant model, integer kernels, the file format, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edge_agent.train import train_local
from fedbus.datasets import get_dataset, train_test_split
from fedbus.errors import ConfigError
from fedbus.export import (
    FORMAT,
    FORMAT_VERSION,
    Int8Model,
    _conv,
    _requant_params,
    _requantize,
    export_int8,
    int8_accuracy,
)
from fedbus.messages import TrainSpec
from fedbus.quant import ActFakeQuant, QATLinear, set_qat
from fedbus.zoo import build_model

torch.set_num_threads(1)

ARCH_OF = {"digits": "mlp", "mnist": "cnn", "motions": "cnn1d"}


def _fake_quant_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


@pytest.fixture(scope="module", params=["digits", "mnist", "motions"])
def trained(request: pytest.FixtureRequest) -> tuple[str, nn.Module, np.ndarray, np.ndarray]:
    """A QAT model of each architecture trained a few epochs on its data set.

    Returns the data set name, the model and an evaluation set: the held-out split, and for
    the 80 BasicMotions windows all of them plus jittered copies, so that agreement is
    measured on enough samples.
    """
    name = request.param
    dataset = get_dataset(name)
    x, y = dataset.load()
    if name == "mnist":
        x, y = x[:3000], y[:3000]
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.3, seed=0)
    torch.manual_seed(0)
    model = build_model(dataset.arch, dataset.model_args)
    spec = TrainSpec(epochs=8 if name == "motions" else 3, batch_size=dataset.batch_size,
                     lr=dataset.lr, momentum=0.9, weight_decay=0.0, qat=True)
    train_local(model, x_train, y_train, spec, seed=0)
    if name == "motions":
        rng = np.random.default_rng(0)
        jitter = [x + rng.normal(0, 0.3, x.shape).astype(np.float32) for _ in range(5)]
        x_test = np.concatenate([x, *jitter])
        y_test = np.tile(y, 6)
    return name, model, x_test, y_test


def test_int8_model_matches_the_fake_quant_model(trained) -> None:
    name, model, x, y = trained
    int8 = export_int8(model, arch=ARCH_OF[name], model_args=get_dataset(name).model_args)
    fq_logits = _fake_quant_logits(model, x)
    fq_pred = fq_logits.argmax(axis=1)
    fq_acc = float((fq_pred == y).mean())
    int8_pred = int8.predict(x)
    int8_acc = float((int8_pred == y).mean())
    agree = float((int8_pred == fq_pred).mean())
    print(f"{name}: fake-quant {fq_acc:.4f}, int8 {int8_acc:.4f}, agreement {agree:.4f}")
    assert fq_acc > {"digits": 0.9, "mnist": 0.9, "motions": 0.8}[name]  # really trained
    assert abs(int8_acc - fq_acc) <= 0.01
    assert agree >= 0.98
    # the integer path reproduces the fake-quant logits up to rounding of a few codes
    diff = np.abs(int8.logits(x) - fq_logits)
    spread = np.abs(fq_logits).mean()
    assert diff.mean() < 0.001 * spread, (diff.mean(), spread)  # measured: about 0.00005
    # ... and is much closer to them than the float model without fake quant is
    set_qat(model, False)
    try:
        float_diff = np.abs(_fake_quant_logits(model, x) - fq_logits).mean()
    finally:
        set_qat(model, True)
    assert diff.mean() < float_diff / 5
    assert int8_accuracy(model, x, y) == pytest.approx(int8_acc)
    assert int8_accuracy(int8, x, y) == pytest.approx(int8_acc)


def test_exported_arrays_are_int8_weights_and_int32_biases(trained) -> None:
    name, model, _, _ = trained
    int8 = export_int8(model)
    weights = {k: v for k, v in int8.arrays().items() if k.endswith(".weight")}
    params = {k: v for k, v in model.named_parameters() if k.endswith(".weight")}
    assert weights.keys() == params.keys()
    for key, codes in weights.items():
        assert codes.dtype == np.int8 and codes.shape == tuple(params[key].shape)
        assert codes.min() >= -127 and codes.max() <= 127
        layer = key.rsplit(".", 1)[0]
        scale = int8.arrays()[f"{layer}.weight_scale"]
        assert scale.dtype == np.float32 and (scale > 0).all()
        # every channel uses its full range: its largest weight sits on +-127
        assert (np.abs(codes.reshape(len(codes), -1)).max(axis=1) == 127).all()
        w = params[key].detach().numpy().reshape(len(codes), -1)
        dequant = codes.reshape(len(codes), -1) * scale[:, None]
        assert np.abs(dequant - w).max() <= scale.max() / 2 * 1.001
        assert int8.arrays()[f"{layer}.bias"].dtype == np.int32
    n_weights = sum(v.size for v in weights.values())
    assert n_weights <= int8.nbytes < n_weights + 1000  # about one byte per weight
    ops = [layer["op"] for layer in int8.manifest["layers"]]
    assert ops == {
        "digits": ["quantize", "linear", "linear"],
        "mnist": ["quantize", "conv2d", "maxpool2d", "conv2d", "maxpool2d", "flatten",
                  "linear"],
        "motions": ["quantize", "conv1d", "maxpool1d", "conv1d", "maxpool1d", "avgpool1d",
                    "linear"],
    }[name]


def test_save_load_round_trip(trained, tmp_path: Path) -> None:
    name, model, x, _ = trained
    args = get_dataset(name).model_args
    int8 = export_int8(model, arch=ARCH_OF[name], model_args=args)
    path = tmp_path / "sub" / "model.npz"
    int8.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.npz"]  # no temp file left
    loaded = Int8Model.load(path)
    assert loaded.manifest == int8.manifest
    assert loaded.manifest["format"] == FORMAT and loaded.manifest["version"] == FORMAT_VERSION
    assert loaded.arch == ARCH_OF[name] and loaded.num_classes == args["num_classes"]
    assert loaded.arrays().keys() == int8.arrays().keys()
    for key, array in int8.arrays().items():
        assert loaded.arrays()[key].dtype == array.dtype
        assert np.array_equal(loaded.arrays()[key], array)
    assert np.array_equal(loaded.logits(x), int8.logits(x))
    with np.load(path, allow_pickle=False) as npz:  # plain arrays, the manifest as JSON bytes
        manifest = json.loads(npz["manifest"].tobytes())
    assert manifest["layers"] == int8.manifest["layers"]
    # flat samples are reshaped to the recorded input shape, as the agent does
    assert np.array_equal(loaded.predict(x.reshape(len(x), -1)), int8.predict(x))


def test_a_device_runs_the_exported_model_without_torch(trained, tmp_path: Path) -> None:
    _, model, x, _ = trained
    export_int8(model).save(tmp_path / "m.npz")
    np.save(tmp_path / "x.npy", x[:50])
    code = (
        "import sys; import numpy as np; from fedbus.export import Int8Model; "
        f"m = Int8Model.load({str(tmp_path / 'm.npz')!r}); "
        f"print(m.predict(np.load({str(tmp_path / 'x.npy')!r})).tolist()); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    labels, torch_loaded = out.stdout.strip().splitlines()
    assert json.loads(labels) == export_int8(model).predict(x[:50]).tolist()
    assert torch_loaded == "False"


def test_integer_convolution_matches_torch() -> None:
    rng = np.random.default_rng(0)
    for dims, stride, padding in [(1, (1,), (2,)), (1, (2,), (0,)), (2, (1, 1), (1, 1)),
                                  (2, (2, 1), (0, 2))]:
        spatial = (17,) * dims
        x = rng.integers(-255, 256, (3, 4, *spatial)).astype(np.int32)
        w = rng.integers(-127, 128, (5, 4, *(3,) * dims)).astype(np.int32)
        got = _conv(x, w, stride, padding, "conv")
        conv = torch.nn.functional.conv1d if dims == 1 else torch.nn.functional.conv2d
        want = conv(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                    stride=stride, padding=padding).numpy()
        assert got.dtype == np.int32 and got.shape == want.shape
        assert np.array_equal(got, want.astype(np.int64))


def test_fixed_point_requantization() -> None:
    rng = np.random.default_rng(0)
    multipliers = np.exp(rng.uniform(np.log(1e-6), np.log(100.0), 500))
    mantissa, shift = _requant_params(multipliers)
    assert ((mantissa >= 2**30) & (mantissa < 2**31)).all() and (shift >= 1).all()
    np.testing.assert_allclose(mantissa * 2.0 ** -shift, multipliers, rtol=2**-30)
    acc = rng.integers(-(2**20), 2**20, 500)
    exact = acc * multipliers
    got = _requantize(acc, mantissa, shift)
    near_tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-6
    assert np.array_equal(got[~near_tie], np.rint(exact[~near_tie]).astype(np.int64))
    # the extremes of int32 do not overflow the int64 product
    extremes = np.array([-(2**31) + 1, 2**31 - 1])
    got = _requantize(extremes, *_requant_params(np.array([0.75])))
    assert got.tolist() == [-1610612735, 1610612735]


def _trained_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", {"in_features": 4, "hidden": [3], "num_classes": 2})
    model.train()
    model(torch.randn(8, 4))  # observe the activation ranges
    return model


def test_export_refuses_what_it_cannot_run() -> None:
    untrained = build_model("mlp", {"in_features": 4, "hidden": [3], "num_classes": 2})
    with pytest.raises(ValueError, match="'input_q' was never observed: train the model"):
        export_int8(untrained)
    with pytest.raises(ValueError, match=r"nn\.Sequential"):
        export_int8(nn.Linear(2, 2))
    layers = list(_trained_mlp().named_children())
    model = nn.Sequential(OrderedDict([*layers[:2], ("act", nn.Tanh()), *layers[2:]]))
    with pytest.raises(ValueError, match=r"cannot export layer 'act' \(Tanh\)"):
        export_int8(model)
    no_input_q = nn.Sequential(QATLinear(4, 2))
    with pytest.raises(ValueError, match="its input is not quantized"):
        export_int8(no_input_q)
    relu_last = nn.Sequential(ActFakeQuant(), QATLinear(4, 2), nn.ReLU())
    relu_last.train()
    relu_last(torch.randn(3, 4))
    with pytest.raises(ValueError, match="a ReLU must be followed by an ActFakeQuant"):
        export_int8(relu_last)


def test_predict_checks_its_input() -> None:
    int8 = export_int8(_trained_mlp())
    assert int8.predict(np.zeros((5, 4))).shape == (5,)
    assert int8.predict(np.zeros((0, 4))).shape == (0,)
    with pytest.raises(ValueError, match=r"samples have shape \(5,\), the model expects \(4,\)"):
        int8.predict(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        int8.predict(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="need x"):
        int8_accuracy(int8, np.zeros((3, 4)), np.zeros(2))


def _stored(tmp_path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    int8 = export_int8(_trained_mlp())
    return int8.manifest, dict(int8.arrays())


def _write(path: Path, manifest: object, arrays: dict[str, np.ndarray]) -> Path:
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    with open(path, "wb") as f:
        np.savez(f, manifest=np.frombuffer(raw, dtype=np.uint8), **arrays)
    return path


def _layer(manifest: dict, op: str) -> dict:
    return next(layer for layer in manifest["layers"] if layer["op"] == op)


MALFORMED = [
    ("not json", lambda m, a: (b"{nope", a), "the manifest is not valid JSON"),
    ("format", lambda m, a: ({**m, "format": "onnx"}, a), "does not say format 'fedbus-int8'"),
    ("version", lambda m, a: ({**m, "version": 2}, a), "format version 2 is not supported"),
    ("no layers", lambda m, a: ({**m, "layers": {}}, a), "'layers' must be a list"),
    ("unknown op", lambda m, a: ({**m, "layers": [*m["layers"], {"op": "softmax"}]}, a),
     "unknown op 'softmax'"),
    ("missing array", lambda m, a: (m, {k: v for k, v in a.items() if k != "head.bias"}),
     "missing array 'head.bias' for bias"),
    ("float weight", lambda m, a: (m, {**a, "fc0.weight": a["fc0.weight"].astype(np.float32)}),
     "weight must be an int8 array"),
    ("bias shape", lambda m, a: (m, {**a, "head.bias": np.zeros(3, np.int32)}),
     "bias must be int32 of shape (2,)"),
    ("negative scale", lambda m, a: (m, {**a, "fc0.weight_scale": -a["fc0.weight_scale"]}),
     "weight scales must be positive"),
    ("-128 weight", lambda m, a: (m, {**a, "fc0.weight": np.full_like(a["fc0.weight"], -128)}),
     "weight codes must be in [-127, 127]"),
    ("zero point", lambda m, a: (_edit(m, "quantize", zero_point=300), a),
     "zero point must be an integer in [0, 255]"),
    ("scale", lambda m, a: (_edit(m, "quantize", scale=float("nan")), a),
     "scale must be a positive finite number"),
    ("after logits", lambda m, a: ({**m, "layers": [*m["layers"], {"op": "flatten"}]}, a),
     "follows the float output layer"),
    ("width", lambda m, a: (m, {**a, "head.weight": np.zeros((2, 5), np.int8)}),
     "takes 5 features, the previous layer gives 3"),
    ("classes", lambda m, a: ({**m, "num_classes": 3}, a), "num_classes 3 does not match"),
    ("name", lambda m, a: (_rename(m, 1, "../x"), a), "needs a name of 1-64"),
    ("same name", lambda m, a: (_rename(m, 2, "fc0"), a), "layer names must be unique"),
]


def _edit(manifest: dict, op: str, **changes: object) -> dict:
    layers = [dict(layer, **changes) if layer["op"] == op else layer
              for layer in manifest["layers"]]
    return {**manifest, "layers": layers}


def _rename(manifest: dict, index: int, name: str) -> dict:
    layers = list(manifest["layers"])
    layers[index] = {**layers[index], "name": name}
    return {**manifest, "layers": layers}


@pytest.mark.parametrize(("case", "make", "message"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_loading_a_malformed_file_is_a_clear_error(tmp_path: Path, case, make, message) -> None:
    manifest, arrays = _stored(tmp_path)
    assert Int8Model.load(_write(tmp_path / "ok.npz", manifest, arrays)).num_classes == 2
    path = _write(tmp_path / "bad.npz", *make(manifest, arrays))
    with pytest.raises(ConfigError) as info:
        Int8Model.load(path)
    text = str(info.value)
    assert text.startswith(f"int8 model {path}: ") and message in text and "\n" not in text


def test_loading_a_file_that_is_no_model(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ConfigError, match=r"not a readable \.npz file"):
        Int8Model.load(garbage)
    with pytest.raises(ConfigError, match=r"not a readable \.npz file"):
        Int8Model.load(tmp_path / "missing.npz")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ConfigError, match=r"a single array, not an \.npz archive"):
        Int8Model.load(single)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((2, 3)), y=np.zeros(2))
    with pytest.raises(ConfigError, match="no 'manifest' array: not a fedbus int8 model"):
        Int8Model.load(data)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, manifest=np.array([{"format": FORMAT}], dtype=object))
    with pytest.raises(ConfigError, match=f"int8 model {pickled}"):
        Int8Model.load(pickled)
