"""Datasets: the built-in ones that ship inside pip packages, and CSV/Parquet files of a PrivateDataset.

Every transformation here uses PUBLIC constants only (clinical bounds declared in code or in the
PrivateDataset manifest). Nothing is fitted to the data: a mean, a median or a min/max taken from
the private records would leak outside the privacy budget, which covers the DP-SGD steps only.
Error messages name files and columns, never a record's value, position or how many records there are:
they end up in Kubernetes status conditions.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import TensorDataset

import dptrain_api
from dptrain.errors import ConfigurationError, DataError
from dptrain_api import BuiltinDataset, BuiltinDatasetFacts
from dptrain_api.dataset import FileSource, PrivateDataset
from dptrain_api.job import DatasetSpec

__all__ = [
    "BUILTIN_DATASETS",
    "DatasetInfo",
    "FeatureBounds",
    "PreparedData",
    "cap_units",
    "holdout_mask",
    "load_builtin",
    "load_data",
    "load_file",
    "record_hashes",
    "shard",
    "shard_key",
    "shard_mask",
    "split_holdout",
    "unit_hashes",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class FeatureBounds:
    """A feature and its PUBLIC range: values are clipped to [min, max], then scaled to [0, 1]."""

    name: str
    min: float
    max: float

    def __post_init__(self) -> None:
        if not self.min < self.max:
            raise ValueError(f"feature {self.name!r}: min ({self.min}) must be below max ({self.max})")


@dataclass(frozen=True)
class DatasetInfo:
    """How a built-in dataset is read: public bounds and provenance, declared in code (never measured from the
    data). Its size, shape, classes and metric are the API's :data:`dptrain_api.BUILTIN_DATASETS` facts."""

    name: str
    description: str
    features: tuple[FeatureBounds, ...]
    """Tabular features with their public bounds; empty for images (see pixel_range)."""
    source: str
    """Citation of the data."""
    pixel_range: tuple[float, float] | None = None
    """Images only: the sensor's value range, public by construction."""

    @property
    def facts(self) -> BuiltinDatasetFacts:
        return dptrain_api.BUILTIN_DATASETS[BuiltinDataset(self.name)]

    @property
    def num_examples(self) -> int:
        return self.facts.num_examples

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.facts.input_shape

    @property
    def num_classes(self) -> int:
        return self.facts.num_classes

    @property
    def eval_metric(self) -> str:
        return self.facts.eval_metric


@dataclass(frozen=True)
class PreparedData:
    """Features ready for training: float32 in [0, 1] (clipped and scaled with public bounds)."""

    name: str
    features: torch.Tensor
    """float32, shape (N, *input_shape)."""
    labels: torch.Tensor
    """int64, shape (N,), values in [0, num_classes)."""
    num_classes: int
    input_shape: tuple[int, ...]
    eval_metric: str
    feature_names: tuple[str, ...] = field(default=())
    """Names of tabular features, in column order; empty for images."""
    units: torch.Tensor | None = None
    """int64, shape (N,): each record's privacy unit, an index into ``unit_ids`` (None: every record is its own)."""
    unit_ids: tuple[str, ...] = field(default=(), repr=False)
    """The units' identifiers as read (private: they only group records and key their side and shard)."""

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_units(self) -> int:
        """Privacy units present (records, without a unit column)."""
        return len(self.unit_ids) if self.units is not None else self.num_examples

    def subset(self, keep: torch.Tensor) -> PreparedData:
        """The records where ``keep`` (bool, (N,)) holds; units are renumbered and units left empty dropped."""
        if self.units is None:
            return replace(self, features=self.features[keep], labels=self.labels[keep])
        present, units = torch.unique(self.units[keep], return_inverse=True)
        ids = tuple(self.unit_ids[int(index)] for index in present)
        return replace(self, features=self.features[keep], labels=self.labels[keep], units=units, unit_ids=ids)


# --- built-in datasets -------------------------------------------------------------------------

# Serum free light chain study (Olmsted County residents aged 50 and over). Bounds are clinical:
# kappa/lambda caps are about 10x the upper reference limits (1.94 and 2.63 mg/dL, Katzmann et al.,
# Clin Chem 2002), so only extreme monoclonal values clip; creatinine 0.4-10 mg/dL spans normal to
# dialysis-range kidney failure; flc.grp is a decile index 1-10 by definition.
_FLCHAIN_FEATURES = (
    FeatureBounds("age", 50.0, 101.0),
    FeatureBounds("sex", 0.0, 1.0),  # 1 = male
    FeatureBounds("kappa", 0.0, 20.0),
    FeatureBounds("lambda", 0.0, 26.0),
    FeatureBounds("flc.grp", 1.0, 10.0),
    FeatureBounds("creatinine", 0.4, 10.0),
    FeatureBounds("mgus", 0.0, 1.0),  # 1 = monoclonal gammopathy diagnosed
)
# Missing creatinine (17% of records) gets a normal adult value: a public constant, not the
# data's mean or median.
_FLCHAIN_CREATININE_FILL = 1.0

# Wisconsin Diagnostic Breast Cancer. The UCI/scikit-learn documentation publishes each feature's
# range; these bounds round those ranges outwards to round numbers so they do not pin the exact
# extreme records. A bound that is too tight only clips (costs accuracy), never privacy.
_BREAST_CANCER_RANGES: tuple[tuple[str, float, float], ...] = (
    ("radius", 5.0, 30.0),
    ("texture", 5.0, 40.0),
    ("perimeter", 40.0, 200.0),
    ("area", 100.0, 2600.0),
    ("smoothness", 0.05, 0.17),
    ("compactness", 0.0, 0.35),
    ("concavity", 0.0, 0.45),
    ("concave points", 0.0, 0.21),
    ("symmetry", 0.1, 0.31),
    ("fractal dimension", 0.045, 0.1),
)
_BREAST_CANCER_ERROR_RANGES: tuple[tuple[str, float, float], ...] = (
    ("radius", 0.0, 3.0),
    ("texture", 0.0, 5.0),
    ("perimeter", 0.0, 22.0),
    ("area", 0.0, 550.0),
    ("smoothness", 0.0, 0.032),
    ("compactness", 0.0, 0.14),
    ("concavity", 0.0, 0.4),
    ("concave points", 0.0, 0.055),
    ("symmetry", 0.0, 0.08),
    ("fractal dimension", 0.0, 0.03),
)
_BREAST_CANCER_WORST_RANGES: tuple[tuple[str, float, float], ...] = (
    ("radius", 5.0, 37.0),
    ("texture", 10.0, 50.0),
    ("perimeter", 50.0, 260.0),
    ("area", 150.0, 4300.0),
    ("smoothness", 0.07, 0.23),
    ("compactness", 0.0, 1.1),
    ("concavity", 0.0, 1.3),
    ("concave points", 0.0, 0.3),
    ("symmetry", 0.15, 0.67),
    ("fractal dimension", 0.05, 0.21),
)
# Same names and order as sklearn's feature_names: mean x, x error, worst x.
_BREAST_CANCER_FEATURES = (
    tuple(FeatureBounds(f"mean {name}", lo, hi) for name, lo, hi in _BREAST_CANCER_RANGES)
    + tuple(FeatureBounds(f"{name} error", lo, hi) for name, lo, hi in _BREAST_CANCER_ERROR_RANGES)
    + tuple(FeatureBounds(f"worst {name}", lo, hi) for name, lo, hi in _BREAST_CANCER_WORST_RANGES)
)

_DIGITS_PIXEL_RANGE = (0.0, 16.0)  # 4x4 blocks of a 32x32 bitmap: counts 0..16 by construction

BUILTIN_DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "flchain": DatasetInfo(
            name="flchain",
            description=(
                "Serum free light chains and death during follow-up (label 1 = died); 7 features. "
                "Cause of death and follow-up time are dropped: they reveal the label."
            ),
            features=_FLCHAIN_FEATURES,
            source=(
                "Dispenzieri A. et al., Use of nonclonal serum immunoglobulin free light chains to predict "
                "overall survival in the general population, Mayo Clin Proc 87(6):517-523, 2012; "
                "via scikit-survival load_flchain (R survival package)."
            ),
        ),
        "breast-cancer": DatasetInfo(
            name="breast-cancer",
            description="Wisconsin Diagnostic Breast Cancer: 30 cell-nucleus features; label 1 = benign, 0 = malignant",
            features=_BREAST_CANCER_FEATURES,
            source=(
                "Street W.N., Wolberg W.H., Mangasarian O.L., Nuclear feature extraction for breast tumor "
                "diagnosis, IS&T/SPIE 1993; UCI ML Repository; via scikit-learn load_breast_cancer."
            ),
        ),
        "digits": DatasetInfo(
            name="digits",
            description="Handwritten digits 0-9 as 8x8 grey-level images (1 channel).",
            features=(),
            source=(
                "Alpaydin E., Kaynak C., Optical Recognition of Handwritten Digits, UCI ML Repository, 1998; "
                "via scikit-learn load_digits."
            ),
            pixel_range=_DIGITS_PIXEL_RANGE,
        ),
    }
)


def _scale(values: FloatArray, bounds: Sequence[FeatureBounds]) -> FloatArray:
    low = np.array([b.min for b in bounds], dtype=np.float64)
    high = np.array([b.max for b in bounds], dtype=np.float64)
    scaled: FloatArray = (np.clip(values, low, high) - low) / (high - low)
    return scaled


def _load_flchain_arrays() -> tuple[FloatArray, IntArray]:
    from sksurv.datasets import load_flchain

    frame, outcome = load_flchain()
    # `chapter` (cause of death) and `futime` (follow-up time, in the outcome) are never read: both
    # encode the label. `sample.yr` is left out too: later samples had shorter follow-up, so it
    # predicts censoring, a study artefact rather than a patient property.
    columns = {
        "age": frame["age"].astype(float),
        "sex": frame["sex"].astype(str).map({"F": 0.0, "M": 1.0}),
        "kappa": frame["kappa"].astype(float),
        "lambda": frame["lambda"].astype(float),
        "flc.grp": frame["flc.grp"].astype(str).astype(float),
        "creatinine": frame["creatinine"].astype(float).fillna(_FLCHAIN_CREATININE_FILL),
        "mgus": frame["mgus"].astype(str).map({"no": 0.0, "yes": 1.0}),
    }
    values = np.column_stack([np.asarray(columns[b.name], dtype=np.float64) for b in _FLCHAIN_FEATURES])
    if np.isnan(values).any():
        # Only an unexpected scikit-survival release (new category codes) can get here.
        missing = [b.name for i, b in enumerate(_FLCHAIN_FEATURES) if np.isnan(values[:, i]).any()]
        raise DataError(f"builtin flchain: unexpected missing or unknown values in {missing}")
    labels = np.asarray(outcome["death"], dtype=np.int64)
    return _scale(values, _FLCHAIN_FEATURES), labels


def _load_breast_cancer_arrays() -> tuple[FloatArray, IntArray]:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    names = tuple(str(n) for n in bunch.feature_names)
    expected = tuple(b.name for b in _BREAST_CANCER_FEATURES)
    if names != expected:
        raise DataError(f"builtin breast-cancer: scikit-learn's feature names changed: {names}")
    values = np.asarray(bunch.data, dtype=np.float64)
    return _scale(values, _BREAST_CANCER_FEATURES), np.asarray(bunch.target, dtype=np.int64)


def _load_digits_arrays() -> tuple[FloatArray, IntArray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    low, high = _DIGITS_PIXEL_RANGE
    images = np.asarray(bunch.images, dtype=np.float64)[:, None, :, :]  # (N, 1, 8, 8): one channel
    scaled: FloatArray = (np.clip(images, low, high) - low) / (high - low)
    return scaled, np.asarray(bunch.target, dtype=np.int64)


_BUILTIN_LOADERS: Mapping[str, Callable[[], tuple[FloatArray, IntArray]]] = MappingProxyType(
    {
        "flchain": _load_flchain_arrays,
        "breast-cancer": _load_breast_cancer_arrays,
        "digits": _load_digits_arrays,
    }
)


def load_builtin(name: str) -> PreparedData:
    """Load a built-in dataset (offline: the data ships inside scikit-learn / scikit-survival)."""
    key = str(name)
    info = BUILTIN_DATASETS.get(key)
    if info is None:
        known = ", ".join(sorted(BUILTIN_DATASETS))
        raise ConfigurationError(f"unknown builtin dataset {key!r}; choose one of: {known}")
    values, labels = _BUILTIN_LOADERS[key]()
    if values.shape != (info.num_examples, *info.input_shape):
        # The privacy plan uses the declared size, so a changed package release must stop the run.
        raise DataError(
            f"builtin {key}: expected shape {(info.num_examples, *info.input_shape)}, "
            f"the installed package gave {values.shape}"
        )
    return PreparedData(
        name=key,
        features=torch.from_numpy(values.astype(np.float32)),
        labels=torch.from_numpy(labels),
        num_classes=info.num_classes,
        input_shape=info.input_shape,
        eval_metric=info.eval_metric,
        feature_names=tuple(b.name for b in info.features),
    )


# --- files ---------------------------------------------------------------------------------------
#
# Only what holds for every neighbouring dataset may stop a run or appear in an error: a missing file or column is
# a property of the file's schema, not of any record. A record whose values are unusable (not a number, missing,
# infinite, a label out of range) is skipped: dropping it depends on that record alone, so training on what is left
# is still DP with respect to adding or removing a record, and nothing outside the pod learns that it was there.
# The pod log (which only the data's steward should read) says which columns had unusable values, and how many.
#
# A CSV record is one physical line, and each line stands alone: it is decoded (UTF-8) and parsed (the csv module,
# RFC 4180 quoting within the line) on its own, so no line can change how another is read. A line that does not
# decode, does not parse (an unmatched quote), or has another number of fields than the header is ONE unusable
# record. There are no multi-line fields and no index inference; columns that are not listed are split off but
# never converted. Parquet is read one row group at a time (only the listed columns); its writer has typed every
# value, so a row group that cannot be read is damage to the file, not a record: the file is refused, loudly.


def _unreadable(path: Path, file_format: str, error: Exception) -> DataError:
    # Parser messages quote lines, positions and values of records: those go to the pod log only.
    logger.warning("cannot read %s as %s: %s: %s", path, file_format, type(error).__name__, error)
    return DataError(f"cannot read {path} as {file_format} (the pod log has the parser's message)")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data file {path} is not a regular file")


def _split_line(raw: bytes, *, encoding: str = "utf-8") -> list[str] | None:
    """One physical line's fields, or None when the line does not decode or parse on its own."""
    try:
        text = raw.rstrip(b"\r\n").decode(encoding)
        return next(csv.reader([text], strict=True), [])
    except (UnicodeDecodeError, csv.Error):
        return None


def _csv_header(path: Path, handle: Any) -> list[str]:
    for raw in handle:
        if raw.strip(b"\r\n \t"):
            # utf-8-sig: spreadsheet exports often start with a byte-order mark that would rename column 1.
            names = _split_line(raw, encoding="utf-8-sig")
            if names is None:
                raise DataError(f"the header row of {path} is not one line of UTF-8 CSV")
            duplicated = sorted({name for name in names if names.count(name) > 1})
            if duplicated:
                raise DataError(f"the header row of {path} names column(s) {duplicated} more than once")
            return names
    raise DataError(f"data file {path} has no header row")


def _read_csv(path: Path, wanted: Sequence[str]) -> tuple[dict[str, list[str | None]], list[bool]]:
    """The wanted columns as strings per record (None where the record's line is unusable as a whole), and which
    records' lines are usable."""
    with path.open("rb") as handle:
        names = _csv_header(path, handle)
        missing = [name for name in wanted if name not in names]
        if missing:
            raise DataError(f"data file {path} lacks column(s) {missing}")
        positions = [names.index(name) for name in wanted]
        columns: dict[str, list[str | None]] = {name: [] for name in wanted}
        lines: list[bool] = []
        for raw in handle:
            if not raw.strip(b"\r\n"):
                continue  # an empty line holds no record
            fields = _split_line(raw)
            if fields is not None and len(fields) != len(names):
                fields = None
            lines.append(fields is not None)
            for name, position in zip(wanted, positions, strict=True):
                columns[name].append(None if fields is None else fields[position])
    return columns, lines


def _read_parquet(path: Path, wanted: Sequence[str]) -> Any:
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
        available = list(reader.schema_arrow.names)
    except Exception as error:  # pyarrow raises many types for malformed files
        raise _unreadable(path, "parquet", error) from None
    missing = [name for name in wanted if name not in available]
    if missing:
        raise DataError(f"data file {path} lacks column(s) {missing}")
    groups = []
    for index in range(reader.num_row_groups):
        try:
            groups.append(reader.read_row_group(index, columns=list(wanted)).to_pandas())
        except Exception as error:
            logger.warning("%s: row group %d cannot be read: %s: %s", path, index, type(error).__name__, error)
            raise DataError(
                f"a row group of {path} cannot be read: the file is damaged (the pod log says which)"
            ) from None
    return pd.concat(groups, ignore_index=True) if groups else pd.DataFrame({name: [] for name in wanted})


def _read_columns(path: Path, file_format: str, wanted: Sequence[str]) -> tuple[Any, npt.NDArray[np.bool_]]:
    """The wanted columns as a DataFrame, and which records' lines are usable as a whole (always, for Parquet);
    DataError for a missing or unreadable file or missing columns."""
    import pandas as pd

    _check_file(path)
    if file_format == "parquet":
        frame = _read_parquet(path, wanted)
        return frame, np.ones(len(frame), dtype=bool)
    columns, lines = _read_csv(path, wanted)
    return pd.DataFrame(columns, dtype=object), np.array(lines, dtype=bool)


def _numeric_column(frame: Any, column: str) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """One column as float64, and which rows hold a usable (finite) number."""
    import pandas as pd

    raw = frame[column]
    if pd.api.types.is_numeric_dtype(raw):  # Parquet numbers and booleans (nullable ones included)
        values = np.asarray(raw.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)
    else:  # CSV strings, or Parquet text/mixed/categorical columns: what does not parse becomes NaN
        numeric = pd.to_numeric(raw.astype(object), errors="coerce")
        values = np.asarray(numeric.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)
    return values, np.isfinite(values)


def _unit_column(frame: Any, column: str) -> tuple[list[str], npt.NDArray[np.bool_]]:
    """A unit column as identifiers (kept as written, stripped), and which rows name one."""
    ids = ["" if value is None else str(value).strip() for value in frame[column].astype(object).tolist()]
    usable = np.array([bool(value) and value.lower() not in ("nan", "none", "null", "na", "n/a") for value in ids])
    return ids, usable.astype(bool) if ids else np.zeros(0, dtype=bool)


def load_file(source: FileSource, *, base_dir: Path, unit_column: str | None = None) -> PreparedData:
    """Load a CSV or Parquet file at ``base_dir / source.path``: clip to the declared bounds, scale to [0, 1].

    Records with an unusable value are skipped (see above); the pod log counts them per column. ``unit_column``
    (a PrivateDataset's privacyUnit.column) groups the records by individual; a record that names none is unusable.
    """
    path = Path(base_dir) / source.path
    bounds = tuple(FeatureBounds(f.name, f.min, f.max) for f in source.features)
    names = [b.name for b in bounds]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"{source.path}: a feature column is listed twice in {names}")
    if source.label_column in names:
        raise ConfigurationError(f"{source.path}: label column {source.label_column!r} is also listed as a feature")
    if unit_column is not None and unit_column in {*names, source.label_column}:
        raise ConfigurationError(f"{source.path}: the unit column {unit_column!r} is also a feature or the label")
    wanted = [*names, source.label_column, *([unit_column] if unit_column is not None else [])]
    frame, lines = _read_columns(path, source.format, wanted)
    columns = [_numeric_column(frame, name) for name in names]
    labels, usable_label = _numeric_column(frame, source.label_column)
    with np.errstate(invalid="ignore"):
        usable_label &= (labels == np.round(labels)) & (labels >= 0) & (labels < source.num_classes)
    usable = lines & usable_label
    checks = [*zip([*names, source.label_column], [ok for _, ok in [*columns, (labels, usable_label)]], strict=True)]
    ids: list[str] = []
    if unit_column is not None:
        ids, named = _unit_column(frame, unit_column)
        checks.append((unit_column, named))
    skipped: dict[str, int] = {}
    if not lines.all():
        skipped["<line>"] = int((~lines).sum())
    for name, ok in checks:
        usable &= ok
        if not (ok | ~lines).all():
            skipped[name] = int((~ok & lines).sum())
    if skipped:  # the pod log only: counts of unusable values are statistics of private records
        # <line>: lines that do not decode (UTF-8), parse (an unmatched quote) or have the header's number of fields.
        logger.warning("%s: skipped records with unusable values (column: records) %s", path, skipped)
    values = np.column_stack([values for values, _ in columns])[usable] if names else np.zeros((0, 0))
    units: torch.Tensor | None = None
    unit_ids: tuple[str, ...] = ()
    if unit_column is not None:
        present, inverse = np.unique(
            np.array([ids[i] for i in np.flatnonzero(usable)], dtype=object), return_inverse=True
        )
        units, unit_ids = torch.from_numpy(inverse.astype(np.int64).reshape(-1)), tuple(str(u) for u in present)
    return PreparedData(
        name=source.path,
        features=torch.from_numpy(_scale(values, bounds).astype(np.float32)),
        labels=torch.from_numpy(labels[usable].astype(np.int64)),
        num_classes=source.num_classes,
        input_shape=(len(bounds),),
        # AUC for binary outcomes: clinical outcomes are usually rare, and accuracy hides that.
        eval_metric="auc" if source.num_classes == 2 else "accuracy",
        feature_names=tuple(names),
        units=units,
        unit_ids=unit_ids,
    )


def load_data(
    spec: DatasetSpec, *, private_dataset: PrivateDataset | None = None, base_dir: Path = Path(".")
) -> PreparedData:
    """The job's data: a builtin, or the source of the PrivateDataset that ``spec.dataset_ref`` names.

    The number of records is never compared with the declared ``numExamples`` (it is private): the plan
    samples each record at the planned rate however many there are.
    """
    if spec.builtin is not None:
        return load_builtin(spec.builtin)
    if spec.dataset_ref is None:
        raise ConfigurationError("dataset: set exactly one of builtin or datasetRef")
    wanted = spec.dataset_ref.name
    if private_dataset is None:
        raise ConfigurationError(f"dataset.datasetRef names PrivateDataset {wanted!r}, but no PrivateDataset was given")
    actual = private_dataset.metadata.name
    if actual != wanted:
        raise ConfigurationError(f"dataset.datasetRef names PrivateDataset {wanted!r}, but the one given is {actual!r}")
    source = private_dataset.spec.source
    if source.builtin is not None:
        data = load_builtin(source.builtin)
    elif source.file is not None:
        unit = private_dataset.spec.privacy_unit
        data = load_file(source.file, base_dir=base_dir, unit_column=unit.column if unit is not None else None)
    else:
        raise ConfigurationError(f"PrivateDataset {wanted!r}: set exactly one of source.builtin or source.file")
    return replace(data, name=wanted)


# --- split ---------------------------------------------------------------------------------------


def record_hashes(features: torch.Tensor, labels: torch.Tensor, *, key: bytes) -> list[int]:
    """A 64-bit keyed hash (blake2b) of each record's own content: its features and its label.

    It depends on the record and the key alone, never on the other records, their number or their order.
    """
    count = int(labels.shape[0])
    if count == 0:
        return []
    rows = features.reshape(count, -1).to(torch.float32).contiguous().numpy()
    targets = labels.to(torch.int64).numpy()
    return [
        int.from_bytes(hashlib.blake2b(row.tobytes() + label.tobytes(), key=key[:64], digest_size=8).digest(), "little")
        for row, label in zip(rows, targets, strict=True)
    ]


def unit_hashes(unit_ids: Sequence[str], *, key: bytes) -> list[int]:
    """A 64-bit keyed hash of each privacy unit's identifier: its side (holdout or training) and its shard depend on
    that unit alone, so all of an individual's records go together."""
    return [
        int.from_bytes(hashlib.blake2b(b"unit\0" + uid.encode(), key=key[:64], digest_size=8).digest(), "little")
        for uid in unit_ids
    ]


def _owner_hashes(data: PreparedData | TensorDataset, *, key: bytes, unit_ids: Sequence[str] = ()) -> list[int]:
    """Per record: its unit's keyed hash (all of a unit's records get the same), else its own content's."""
    ids: Sequence[str]
    if isinstance(data, PreparedData):
        features, labels, units, ids = data.features, data.labels, data.units, data.unit_ids
    else:
        features, labels = data.tensors[0], data.tensors[1]
        units, ids = (data.tensors[2] if len(data.tensors) > 2 else None), unit_ids
    if units is None:
        return record_hashes(features, labels, key=key)
    per_unit = unit_hashes(ids, key=key)
    return [per_unit[int(index)] for index in units.tolist()]


def cap_units(data: PreparedData, *, max_records: int, key: bytes) -> PreparedData:
    """At most ``max_records`` records per unit: the ones with the smallest keyed hash of their own content, so which
    are kept depends on that unit's records alone (never on other units). Without units, ``data`` itself."""
    if data.units is None or data.num_examples == 0:
        return data
    hashes = np.array(
        record_hashes(data.features, data.labels, key=hashlib.sha256(b"dptrain/cap/v1\0" + key).digest()),
        dtype=np.uint64,
    )
    units = data.units.numpy()
    order = np.lexsort((hashes, units))  # by unit, then hash
    sorted_units = units[order]
    starts = np.searchsorted(sorted_units, sorted_units, side="left")
    rank = np.arange(len(order)) - starts
    keep = np.zeros(len(order), dtype=bool)
    keep[order[rank < max_records]] = True
    return data.subset(torch.from_numpy(keep))


def holdout_mask(data: PreparedData, *, fraction: float, key: bytes) -> torch.Tensor:
    """Which records are held out: those whose keyed hash falls below ``fraction``; the hash of the record's own
    content, or of its unit's identifier when the data has privacy units (a unit's records go together).

    A record's side depends on that record (or its unit) and the dataset's key alone, never on the other records,
    their number or their order: adding or removing one record (unit) moves no other between training and holdout.
    """
    count = data.num_examples
    if fraction <= 0.0 or count == 0:
        return torch.zeros(count, dtype=torch.bool)
    threshold = int(fraction * 2**64)
    return torch.tensor([value < threshold for value in _owner_hashes(data, key=key)], dtype=torch.bool)


def split_holdout(data: PreparedData, *, fraction: float, key: bytes) -> tuple[TensorDataset, TensorDataset]:
    """(training, holdout) TensorDatasets of (features, labels[, unit index]), by :func:`holdout_mask`. With units,
    the third tensor is each record's index into ``data.unit_ids``."""
    held_out = holdout_mask(data, fraction=fraction, key=key)
    tensors = (data.features, data.labels) if data.units is None else (data.features, data.labels, data.units)
    train = TensorDataset(*(tensor[~held_out] for tensor in tensors))
    holdout = TensorDataset(*(tensor[held_out] for tensor in tensors))
    return train, holdout


def shard_key(key: bytes) -> bytes:
    """The key of the training shards, derived from the holdout ``key`` but independent of it.

    With the holdout's own key, every training record would have a hash above the holdout fraction and the
    shards would be as uneven as the split (the first one short by that fraction).
    """
    return hashlib.sha256(b"dptrain/shard/v1\0" + key).digest()


def shard_mask(
    dataset: TensorDataset, *, shards: int, index: int, key: bytes, unit_ids: Sequence[str] = ()
) -> torch.Tensor:
    """Which records of ``dataset`` belong to shard ``index`` of ``shards``: by a keyed hash of each record, or of
    its unit's identifier (``unit_ids``, indexed by the dataset's third tensor) when it has privacy units.

    Shard = ⌊hash · shards / 2⁶⁴⌋, so the shards are disjoint, cover every record, and a record's shard depends on
    that record (unit) and ``key`` alone: adding or removing one record (unit) moves no other between shards. Each
    rank Poisson-samples its own shard's units at the global rate q, so the union of the ranks' batches is exactly
    a Poisson sample of the whole training partition at q (what the accountant assumes).
    """
    if not 0 <= index < shards:
        raise ValueError(f"shard index {index} is not in [0, {shards})")
    if shards == 1:
        return torch.ones(int(dataset.tensors[1].shape[0]), dtype=torch.bool)
    owners = [(value * shards) >> 64 for value in _owner_hashes(dataset, key=key, unit_ids=unit_ids)]
    return torch.tensor([owner == index for owner in owners], dtype=torch.bool)


def shard(
    dataset: TensorDataset, *, shards: int, index: int, key: bytes, unit_ids: Sequence[str] = ()
) -> TensorDataset:
    """Shard ``index`` of ``shards`` of ``dataset`` (see :func:`shard_mask`)."""
    if shards == 1:
        return dataset
    mask = shard_mask(dataset, shards=shards, index=index, key=key, unit_ids=unit_ids)
    return TensorDataset(*(tensor[mask] for tensor in dataset.tensors))
