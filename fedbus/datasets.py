"""Local data: loading a device's files, bundled demo data and federated splits — all offline.

A device's data is a ``.csv`` file, an ``.npz`` file or a directory of them. Every problem with
a user's file is a ``ConfigError`` with one line naming the file and what is wrong.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import math
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from fedbus.errors import ConfigError

__all__ = [
    "DATA_SUFFIXES",
    "dirichlet_split",
    "load_digits",
    "load_local_data",
    "train_test_split",
    "write_npz",
]

DATA_SUFFIXES = (".csv", ".npz")
_DIGITS_FILE = ("datasets", "data", "digits.csv.gz")


def load_local_data(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load ``(x, y)`` from a ``.csv``, an ``.npz`` or a directory of them.

    CSV: an optional header; the column named ``label`` (else the last column) holds the
    label, every other column is a numeric feature; x is ``[N, F]``. NPZ: arrays ``x`` (any
    shape ``[N, ...]``, kept) and ``y``. A directory's data files are read in name order and
    concatenated. x is float32 and finite, y int64 and non-negative.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir()
            if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise ConfigError(f"data directory {path}: no .csv or .npz files")
        parts = [_load_file(p) for p in files]
        shape = parts[0][0].shape[1:]
        for p, (x, _) in zip(files, parts, strict=True):
            if x.shape[1:] != shape:
                raise ConfigError(
                    f"data file {p}: samples have shape {x.shape[1:]}, but {files[0].name} "
                    f"has {shape}"
                )
        x = np.concatenate([x for x, _ in parts])
        y = np.concatenate([y for _, y in parts])
        return x, y
    if not path.exists():
        raise ConfigError(f"data file {path}: no such file or directory")
    return _load_file(path)


def _load_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        x, y = _load_csv(path)
    elif suffix == ".npz":
        x, y = _load_npz(path)
    else:
        raise ConfigError(f"data file {path}: unsupported type (use .csv or .npz)")
    return x, _check_labels(path, y)


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _load_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = [(i, row) for i, row in enumerate(csv.reader(f), 1) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"data file {path}: cannot read: {exc}") from None
    label_col = -1
    header: list[str] = []
    if rows and any(_parse_float(cell) is None for cell in rows[0][1]):
        header = [cell.strip().lower() for cell in rows[0][1]]
        if "label" in header:
            label_col = header.index("label")
        rows = rows[1:]
    if not rows:
        raise ConfigError(f"data file {path}: no data rows")
    width = len(rows[0][1])
    if label_col >= 0 and len(header) != width:
        raise ConfigError(
            f"data file {path}: the header has {len(header)} columns but the data {width}"
        )
    if width < 2:
        raise ConfigError(f"data file {path}: need at least one feature column and a label")
    if label_col < 0:
        label_col = width - 1
    values = np.empty((len(rows), width), dtype=np.float64)
    for r, (line, row) in enumerate(rows):
        if len(row) != width:
            raise ConfigError(
                f"data file {path}: line {line} has {len(row)} columns, expected {width}"
            )
        for c, cell in enumerate(row):
            value = _parse_float(cell)
            if value is None:
                raise ConfigError(
                    f"data file {path}: non-numeric value {cell!r} at line {line}, "
                    f"column {c + 1}"
                )
            values[r, c] = value
    y = values[:, label_col]
    x = np.delete(values, label_col, axis=1)
    return _check_features(path, x), y


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise ConfigError(
                    f"data file {path}: missing array {missing[0]!r} (has: "
                    f"{', '.join(npz.files) or 'nothing'})"
                )
            x, y = npz["x"], npz["y"]
    except ConfigError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ConfigError(f"data file {path}: not a readable .npz file: {exc}") from None
    if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise ConfigError(f"data file {path}: x and y must be numeric arrays")
    if x.ndim < 2 or y.ndim != 1:
        raise ConfigError(
            f"data file {path}: need x of shape [N, ...] and y of shape [N], got "
            f"{x.shape} and {y.shape}"
        )
    if len(x) != len(y):
        raise ConfigError(f"data file {path}: x has {len(x)} samples but y has {len(y)}")
    if len(y) == 0:
        raise ConfigError(f"data file {path}: no data rows")
    return _check_features(path, x), y


def _check_features(path: Path, x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x32)
    if bad.any():
        first = int(np.argwhere(bad.reshape(len(x32), -1).any(axis=1))[0, 0])
        raise ConfigError(
            f"data file {path}: sample {first + 1} has NaN or infinite features "
            "(or values too large for float32)"
        )
    return x32


def _check_labels(path: Path, y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.argmax(bad))
            raise ConfigError(
                f"data file {path}: label of sample {i + 1} is {_show(y[i])}, not an integer"
            )
    if (y < 0).any():
        i = int(np.argmax(y < 0))
        raise ConfigError(f"data file {path}: label of sample {i + 1} is negative ({_show(y[i])})")
    if y.max() > np.iinfo(np.int32).max:
        raise ConfigError(f"data file {path}: label {_show(y.max())} is too large")
    return y.astype(np.int64)


def _show(value: np.generic) -> str:
    item = value.item()
    return str(int(item)) if isinstance(item, float) and item.is_integer() else repr(item)


def write_npz(path: str | Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write ``x`` (as float32) and ``y`` (as int64) to ``path`` atomically, creating folders."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"x {x.shape} and y {y.shape} must have the same number of samples")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, x=x, y=y)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 handwritten digits: x ``[1797, 64]`` in [0, 1], y ``[1797]``.

    The file is read straight from the installed package; scikit-learn is not imported.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location, *_DIGITS_FILE)
        if path.is_file():
            break
    else:
        raise ConfigError(
            "the digits data ships with scikit-learn, which is not installed: "
            "pip install scikit-learn"
        )
    try:
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"cannot read the digits data {path}: {exc}") from None
    x = np.ascontiguousarray(data[:, :-1] / 16.0, dtype=np.float32)
    y = data[:, -1].astype(np.int64)
    return x, y


def train_test_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified shuffled split: ``(x_train, y_train, x_test, y_test)``.

    Each class contributes ``round(n_class * test_fraction)`` samples to the test set.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    y = np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    train: list[np.ndarray] = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = math.floor(len(idx) * test_fraction + 0.5)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train)) if train else np.array([], np.int64)
    test_idx = rng.permutation(np.concatenate(test)) if test else np.array([], np.int64)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def dirichlet_split(
    y: np.ndarray, n_parts: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Non-IID label-skew split of ``range(len(y))`` into ``n_parts`` sorted index arrays.

    For each class, proportions over the parts are drawn from Dirichlet(``alpha``); small
    alpha means each part sees few classes. Every index lands in exactly one part and each
    part gets at least ``min_size``: the draw is repeated a few times, then the smallest parts
    are topped up from the largest ones. Deterministic for a given ``seed``.
    """
    y = np.asarray(y)
    if n_parts < 1:
        raise ValueError(f"n_parts must be at least 1, got {n_parts}")
    if not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    if min_size < 0 or n_parts * min_size > len(y):
        raise ValueError(
            f"cannot give {n_parts} parts at least {min_size} samples each from {len(y)}"
        )
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(y == label) for label in np.unique(y)]
    parts: list[list[int]] = []
    for _attempt in range(20):
        parts = [[] for _ in range(n_parts)]
        for idx in classes:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(n_parts, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).round().astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        _top_up(parts, min_size, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _top_up(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> None:
    """Move random samples from the largest parts into parts smaller than ``min_size``."""
    for small in sorted(range(len(parts)), key=lambda i: (len(parts[i]), i)):
        while len(parts[small]) < min_size:
            donor = max(range(len(parts)), key=lambda i: (len(parts[i]), -i))
            spare = len(parts[donor]) - min_size
            take = min(min_size - len(parts[small]), spare)
            rng.shuffle(parts[donor])
            parts[small].extend(parts[donor][len(parts[donor]) - take:])
            del parts[donor][len(parts[donor]) - take:]
