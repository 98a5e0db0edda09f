"""Offline data: local files, bundled digits, and federated splits."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedbus.datasets import (
    dirichlet_split,
    load_digits,
    load_local_data,
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
