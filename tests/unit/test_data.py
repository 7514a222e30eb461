"""dptrain.data: built-in datasets, the CSV/Parquet loader's refusals, and the seeded split."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from dptrain.data import (
    BUILTIN_DATASETS,
    PreparedData,
    holdout_mask,
    load_builtin,
    load_data,
    load_file,
    split_holdout,
)
from dptrain.errors import ConfigurationError, DataError
from dptrain_api.common import LocalObjectReference, ObjectMeta
from dptrain_api.dataset import (
    DatasetSource,
    FeatureColumn,
    FileSource,
    PrivacyBudget,
    PrivateDataset,
    PrivateDatasetSpec,
)
from dptrain_api.job import DatasetSpec


@pytest.fixture(scope="module")
def builtins() -> dict[str, PreparedData]:
    return {name: load_builtin(name) for name in BUILTIN_DATASETS}


# --- built-ins -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flchain", "breast-cancer", "digits"])
def test_builtin_matches_its_declared_metadata(builtins: dict[str, PreparedData], name: str) -> None:
    info = BUILTIN_DATASETS[name]
    data = builtins[name]
    assert data.name == name
    assert data.num_examples == info.num_examples
    assert tuple(data.features.shape) == (info.num_examples, *info.input_shape)
    assert data.input_shape == info.input_shape
    assert data.features.dtype == torch.float32
    assert data.labels.dtype == torch.int64
    assert tuple(data.labels.shape) == (info.num_examples,)
    assert int(data.labels.min()) >= 0
    assert int(data.labels.max()) < info.num_classes
    assert set(data.labels.unique().tolist()) == set(range(info.num_classes))
    assert float(data.features.min()) >= 0.0
    assert float(data.features.max()) <= 1.0
    assert data.eval_metric == info.eval_metric
    assert data.feature_names == tuple(f.name for f in info.features)
    assert info.source


def test_builtin_metadata() -> None:
    assert set(BUILTIN_DATASETS) == {"flchain", "breast-cancer", "digits"}
    assert BUILTIN_DATASETS["flchain"].input_shape == (7,)
    assert BUILTIN_DATASETS["breast-cancer"].input_shape == (30,)
    assert BUILTIN_DATASETS["digits"].input_shape == (1, 8, 8)
    assert BUILTIN_DATASETS["digits"].features == ()
    assert BUILTIN_DATASETS["digits"].pixel_range == (0.0, 16.0)
    for info in BUILTIN_DATASETS.values():
        assert all(f.min < f.max for f in info.features)


def test_flchain_drops_label_leaking_columns(builtins: dict[str, PreparedData]) -> None:
    names = builtins["flchain"].feature_names
    assert not any("chapter" in n or "futime" in n or "sample" in n for n in names)
    assert names == ("age", "sex", "kappa", "lambda", "flc.grp", "creatinine", "mgus")


def test_flchain_death_rate(builtins: dict[str, PreparedData]) -> None:
    assert float(builtins["flchain"].labels.float().mean()) == pytest.approx(0.2755, abs=0.001)


def test_flchain_uses_public_bounds_and_fill() -> None:
    from sksurv.datasets import load_flchain

    raw, _ = load_flchain()
    data = load_builtin("flchain")
    bounds = {f.name: f for f in BUILTIN_DATASETS["flchain"].features}
    age = bounds["age"]
    expected_age = (np.clip(raw["age"].to_numpy(float), age.min, age.max) - age.min) / (age.max - age.min)
    np.testing.assert_allclose(data.features[:, 0].numpy(), expected_age, atol=1e-6)
    # Missing creatinine gets the public normal value 1.0 mg/dL, not a statistic of the data.
    creatinine = bounds["creatinine"]
    missing = torch.from_numpy(raw["creatinine"].isna().to_numpy().copy())
    assert int(missing.sum()) == 1350
    filled = (1.0 - creatinine.min) / (creatinine.max - creatinine.min)
    np.testing.assert_allclose(data.features[missing, 5].numpy(), filled, atol=1e-6)
    # kappa above the declared cap (20 mg/dL) clips to exactly 1.
    above_cap = torch.from_numpy(raw["kappa"].to_numpy(float) > 20)
    assert int(above_cap.sum()) >= 1
    assert float(data.features[above_cap, 2].min()) == 1.0
    sex = data.features[:, 1].numpy()
    assert set(np.unique(sex).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(sex == 1.0, (raw["sex"].astype(str) == "M").to_numpy())


def test_breast_cancer_scaling_uses_declared_bounds(builtins: dict[str, PreparedData]) -> None:
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer().data
    features = BUILTIN_DATASETS["breast-cancer"].features
    low = np.array([f.min for f in features])
    high = np.array([f.max for f in features])
    expected = (np.clip(raw, low, high) - low) / (high - low)
    np.testing.assert_allclose(builtins["breast-cancer"].features.numpy(), expected, atol=1e-6)
    # The published ranges sit inside the declared bounds: nothing real is clipped.
    assert (raw >= low).all()
    assert (raw <= high).all()


def test_breast_cancer_and_digits_class_balance(builtins: dict[str, PreparedData]) -> None:
    assert torch.bincount(builtins["breast-cancer"].labels).tolist() == [212, 357]
    counts = torch.bincount(builtins["digits"].labels).tolist()
    assert len(counts) == 10
    assert min(counts) == 174
    assert max(counts) == 183


def test_digits_pixels_scaled_from_the_public_range(builtins: dict[str, PreparedData]) -> None:
    from sklearn.datasets import load_digits

    images = load_digits().images
    np.testing.assert_allclose(builtins["digits"].features[:, 0].numpy(), images / 16.0, atol=1e-6)
    assert float(builtins["digits"].features.max()) == 1.0


def test_unknown_builtin() -> None:
    with pytest.raises(ConfigurationError, match="unknown builtin dataset 'mnist'"):
        load_builtin("mnist")


# --- files: happy paths ---------------------------------------------------------------------------


def _source(path: str = "data.csv", **overrides: Any) -> FileSource:
    settings: dict[str, Any] = {
        "claim_name": "hospital-data",
        "path": path,
        "label_column": "outcome",
        "features": [FeatureColumn(name="age", min=20, max=100), FeatureColumn(name="lactate", min=0, max=10)],
        "num_classes": 2,
    }
    settings.update(overrides)
    return FileSource(**settings)


def test_csv_clips_and_scales_with_declared_bounds(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text(
        "patient,age,lactate,outcome\nA,60,5,0\nB,120,-3,1\nC,10,10,1\nD,20,2.5,0\n", encoding="utf-8"
    )
    data = load_file(_source(), base_dir=tmp_path)
    expected = [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0], [0.0, 0.25]]
    np.testing.assert_allclose(data.features.numpy(), expected)
    assert data.features.dtype == torch.float32
    assert data.labels.tolist() == [0, 1, 1, 0]
    assert data.labels.dtype == torch.int64
    assert data.input_shape == (2,)
    assert data.feature_names == ("age", "lactate")
    assert data.num_classes == 2
    assert data.eval_metric == "auc"


def test_parquet_happy_path(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "age": [25.0, 100.0, 150.0],
            "lactate": [True, False, True],  # booleans are read as 0/1
            "outcome": np.array([2, 0, 1], dtype=np.int32),
            "notes": ["x", "y", "z"],  # columns not listed are ignored
        }
    )
    frame.to_parquet(tmp_path / "icu.parquet")
    features = [FeatureColumn(name="age", min=0, max=100), FeatureColumn(name="lactate", min=0, max=1)]
    data = load_file(_source("icu.parquet", format="parquet", features=features, num_classes=3), base_dir=tmp_path)
    np.testing.assert_allclose(data.features.numpy(), [[0.25, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assert data.labels.tolist() == [2, 0, 1]
    assert data.eval_metric == "accuracy"


def test_single_class_present_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("age,lactate,outcome\n30,1,0\n40,2,0\n", encoding="utf-8")
    data = load_file(_source(num_classes=3), base_dir=tmp_path)
    assert data.labels.tolist() == [0, 0]
    assert data.num_classes == 3


def test_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    # Spreadsheet exports start with a BOM; it must not rename the first column.
    (tmp_path / "data.csv").write_bytes("age,lactate,outcome\n60,5,1\n".encode("utf-8-sig"))
    data = load_file(_source(), base_dir=tmp_path)
    np.testing.assert_allclose(data.features.numpy(), [[0.5, 0.5]])


def test_integer_valued_float_labels_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("age,lactate,outcome\n30,1,1.0\n40,2,0.0\n", encoding="utf-8")
    assert load_file(_source(), base_dir=tmp_path).labels.tolist() == [1, 0]


# --- files: the bad-data corpus ------------------------------------------------------------------

_HEADER = "age,lactate,outcome\n"


def _write(content: str | bytes) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        path = directory / "data.csv"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")

    return write


def _write_parquet(frame: dict[str, list[Any]]) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        pd.DataFrame(frame).to_parquet(directory / "data.parquet")

    return write


# Problems of the file's schema (the same for every neighbouring dataset): refused, naming the file.
BAD_FILES: list[Any] = [
    pytest.param(lambda _: None, {}, ["does not exist"], id="missing-file"),
    pytest.param(_write(""), {}, ["no header row"], id="empty-file"),
    pytest.param(_write("\n\n"), {}, ["no header row"], id="blank-lines"),
    pytest.param(_write("age,lactate\n30,1\n"), {}, ["lacks column", "'outcome'"], id="missing-label-column"),
    pytest.param(
        _write("outcome,weight\n1,70\n"), {}, ["lacks column", "'age'", "'lactate'"], id="missing-feature-columns"
    ),
    pytest.param(
        _write_parquet({"age": [30.0], "outcome": [0]}),
        {"path": "data.parquet", "format": "parquet"},
        ["lacks column", "'lactate'"],
        id="parquet-missing-column",
    ),
    pytest.param(
        lambda d: (d / "data.parquet").write_bytes(b"this is not parquet"),
        {"path": "data.parquet", "format": "parquet"},
        ["cannot read", "parquet"],
        id="corrupt-parquet",
    ),
]


@pytest.mark.parametrize(("write", "overrides", "expected"), BAD_FILES)
def test_a_bad_file_is_refused_with_a_clear_message(
    tmp_path: Path, write: Callable[[Path], None], overrides: dict[str, Any], expected: list[str]
) -> None:
    write(tmp_path)
    source = _source(**overrides)
    with pytest.raises(DataError) as caught:
        load_file(source, base_dir=tmp_path)
    message = str(caught.value)
    assert source.path in message  # names the file
    for text in expected:
        assert text in message
    assert caught.value.exit_code == 3


_GOOD = "30,1,0\n40,2,1\n"
# A record with an unusable value: skipped (a per-record filter), never an error, never counted outside the pod.
BAD_RECORDS: list[Any] = [
    pytest.param("SECRET-MRN-4711,2,1\n", "age", id="non-numeric-feature"),
    pytest.param("50,,0\n", "lactate", id="missing-feature"),
    pytest.param("50,NaN,0\n", "lactate", id="literal-nan-feature"),
    pytest.param("50,inf,0\n", "lactate", id="infinite-feature"),
    pytest.param("50,3,\n", "outcome", id="missing-label"),
    pytest.param("50,3,2\n", "outcome", id="label-out-of-range"),
    pytest.param("50,3,-1\n", "outcome", id="negative-label"),
    pytest.param("50,3,0.5\n", "outcome", id="fractional-label"),
    pytest.param("50,3,yes\n", "outcome", id="text-label"),
    pytest.param("50,3,0,extra\n", None, id="malformed-line"),
]


@pytest.mark.parametrize(("record", "column"), BAD_RECORDS)
def test_a_record_with_an_unusable_value_is_skipped_like_an_absent_one(
    tmp_path: Path, record: str, column: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Neighbouring datasets D and D + one bad record load to the same data: no error, no count leaves the pod."""
    clean, with_bad = tmp_path / "clean", tmp_path / "bad"
    for folder, body in ((clean, _HEADER + _GOOD), (with_bad, _HEADER + _GOOD[:7] + record + _GOOD[7:])):
        folder.mkdir()
        (folder / "data.csv").write_text(body, encoding="utf-8")
    expected = load_file(_source(), base_dir=clean)
    with caplog.at_level("WARNING", logger="dptrain.data"):
        loaded = load_file(_source(), base_dir=with_bad)
    assert torch.equal(loaded.features, expected.features)
    assert torch.equal(loaded.labels, expected.labels)
    if column is not None:  # the pod log (the steward's) says where; nothing else does
        assert f"'{column}': 1" in caplog.text
    assert "SECRET" not in caplog.text


def test_parquet_records_with_unusable_values_are_skipped(tmp_path: Path) -> None:
    pd.DataFrame({"age": ["30", "n/a", None], "lactate": [1.0, 2.0, 3.0], "outcome": [0, 1, 1]}).to_parquet(
        tmp_path / "data.parquet"
    )
    data = load_file(_source(path="data.parquet", format="parquet"), base_dir=tmp_path)
    assert data.labels.tolist() == [0]


def test_a_file_with_no_usable_record_trains_on_nothing_rather_than_failing(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text(_HEADER + "x,1,0\n", encoding="utf-8")
    assert load_file(_source(), base_dir=tmp_path).num_examples == 0
    (tmp_path / "data.csv").write_text(_HEADER, encoding="utf-8")
    assert load_file(_source(), base_dir=tmp_path).num_examples == 0


def test_a_line_that_is_not_utf8_is_one_unusable_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "data.csv").write_bytes(_HEADER.encode() + b"30,1,0\n\xff\xfeSECRET,2,1\n40,2,1\n")
    with caplog.at_level("WARNING", logger="dptrain.data"):
        data = load_file(_source(), base_dir=tmp_path)
    assert data.labels.tolist() == [0, 1]
    assert "'<line>': 1" in caplog.text
    assert "SECRET" not in caplog.text


# Lines that pandas' whole-file parser let change how OTHER lines are read (or fail the file): each is one
# unusable record here, and the other records load exactly as without it (issue 19, 2).
_PATIENTS = "patient,notes,age,lactate,outcome\n" + "".join(
    f"P{i},stable,{30 + i},{1 + i % 5},{i % 2}\n" for i in range(12)
)
MALFORMED_LINES: list[Any] = [
    pytest.param(b'P99,"never closed,50,3,1\n', id="unmatched-quote"),
    pytest.param(b'P99,"closes on a later line\n', id="quote-closing-later"),
    pytest.param(b"P99,caf\xe9 au lait,50,3,1\n", id="latin-1-byte-in-free-text"),
    pytest.param(b"P99,extra,50,3,1,surplus\n", id="extra-field"),
    pytest.param(b"P99,short,50\n", id="missing-fields"),
    pytest.param(b'P99,"a"b",50,3,1\n', id="text-after-a-closing-quote"),
]


@pytest.mark.parametrize("line", MALFORMED_LINES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_malformed_line_is_skipped_on_its_own(tmp_path: Path, line: bytes, where: str) -> None:
    header, *records = _PATIENTS.encode().splitlines(keepends=True)
    position = {"first": 0, "middle": 6, "last": len(records)}[where]
    clean, bad = tmp_path / "clean", tmp_path / "bad"
    for folder, body in ((clean, records), (bad, [*records[:position], line, *records[position:]])):
        folder.mkdir()
        (folder / "data.csv").write_bytes(header + b"".join(body))
    expected = load_file(_source(), base_dir=clean)
    loaded = load_file(_source(), base_dir=bad)
    assert expected.num_examples == 12
    assert torch.equal(loaded.features, expected.features)
    assert torch.equal(loaded.labels, expected.labels)


def test_a_free_text_column_is_never_parsed(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text('notes,age,lactate,outcome\n"1e308, ""quoted""",30,1,0\n', encoding="utf-8")
    assert load_file(_source(), base_dir=tmp_path).labels.tolist() == [0]


def test_a_damaged_parquet_row_group_refuses_the_file(tmp_path: Path) -> None:
    frame = pd.DataFrame({"age": [30.0 + i for i in range(40)], "lactate": [1.0] * 40, "outcome": [0, 1] * 20})
    frame.to_parquet(tmp_path / "data.parquet", row_group_size=10)
    raw = bytearray((tmp_path / "data.parquet").read_bytes())
    raw[200:260] = b"\xff" * 60  # inside a row group's pages; the footer is intact
    (tmp_path / "data.parquet").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"row group .* cannot be read"):
        load_file(_source(path="data.parquet", format="parquet"), base_dir=tmp_path)


def test_feature_listed_as_label_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text(_HEADER + "30,1,0\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="also listed as a feature"):
        load_file(_source(label_column="age"), base_dir=tmp_path)


# --- load_data -----------------------------------------------------------------------------------


def _private_dataset(name: str, source: DatasetSource, num_examples: int | None) -> PrivateDataset:
    return PrivateDataset(
        metadata=ObjectMeta(name=name),
        spec=PrivateDatasetSpec(source=source, num_examples=num_examples, budget=PrivacyBudget(epsilon=3.0)),
    )


def _ref(name: str) -> DatasetSpec:
    return DatasetSpec(dataset_ref=LocalObjectReference(name=name))


def test_load_data_builtin() -> None:
    data = load_data(DatasetSpec(builtin="breast-cancer"))
    assert data.name == "breast-cancer"
    assert data.num_examples == 569


def test_load_data_file_through_a_private_dataset(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text(_HEADER + "30,1,0\n40,2,1\n50,3,0\n", encoding="utf-8")
    dataset = _private_dataset("icu-stays", DatasetSource(file=_source()), num_examples=3)
    data = load_data(_ref("icu-stays"), private_dataset=dataset, base_dir=tmp_path)
    assert data.name == "icu-stays"
    assert data.num_examples == 3
    assert data.labels.tolist() == [0, 1, 0]


def test_load_data_never_compares_the_true_count_with_the_declared_one(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text(_HEADER + "30,1,0\n40,2,1\n50,3,0\n", encoding="utf-8")
    dataset = _private_dataset("icu-stays", DatasetSource(file=_source()), num_examples=5)
    assert load_data(_ref("icu-stays"), private_dataset=dataset, base_dir=tmp_path).num_examples == 3
    wrong = _private_dataset("wdbc", DatasetSource(builtin="breast-cancer"), num_examples=600)
    assert load_data(_ref("wdbc"), private_dataset=wrong).num_examples == 569


def test_load_data_needs_the_referenced_private_dataset() -> None:
    with pytest.raises(ConfigurationError, match=r"'icu-stays'.*no PrivateDataset was given"):
        load_data(_ref("icu-stays"))
    other = _private_dataset("other", DatasetSource(builtin="digits"), num_examples=None)
    with pytest.raises(ConfigurationError, match=r"'icu-stays'.*'other'"):
        load_data(_ref("icu-stays"), private_dataset=other)


# --- split ---------------------------------------------------------------------------------------


def _indexed(n: int) -> PreparedData:
    # The feature is the row index, so the split's rows can be traced back.
    return PreparedData(
        name="indexed",
        features=torch.arange(n, dtype=torch.float32).unsqueeze(1),
        labels=torch.arange(n, dtype=torch.int64) % 2,
        num_classes=2,
        input_shape=(1,),
        eval_metric="auc",
    )


KEY = b"k" * 32


def test_the_holdout_is_about_the_fraction_disjoint_and_complete() -> None:
    data = _indexed(2000)
    train, holdout = split_holdout(data, fraction=0.2, key=KEY)
    assert 320 < len(holdout) < 480  # Binomial(2000, 0.2): mean 400, sd 18
    train_ids = set(train.tensors[0][:, 0].long().tolist())
    holdout_ids = set(holdout.tensors[0][:, 0].long().tolist())
    assert not train_ids & holdout_ids
    assert train_ids | holdout_ids == set(range(2000))
    assert torch.equal(train.tensors[1], train.tensors[0][:, 0].long() % 2)  # labels travel with their rows


def test_adding_or_removing_a_record_moves_no_other_record() -> None:
    data = _indexed(300)
    mask = holdout_mask(data, fraction=0.3, key=KEY)
    fewer = PreparedData(**{**data.__dict__, "features": data.features[1:], "labels": data.labels[1:]})
    assert torch.equal(holdout_mask(fewer, fraction=0.3, key=KEY), mask[1:])
    shuffled = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    reordered = PreparedData(**{**data.__dict__, "features": data.features[shuffled], "labels": data.labels[shuffled]})
    assert torch.equal(holdout_mask(reordered, fraction=0.3, key=KEY), mask[shuffled])


def test_the_holdout_is_fixed_by_the_key() -> None:
    data = _indexed(500)
    assert torch.equal(holdout_mask(data, fraction=0.3, key=KEY), holdout_mask(data, fraction=0.3, key=KEY))
    assert not torch.equal(holdout_mask(data, fraction=0.3, key=KEY), holdout_mask(data, fraction=0.3, key=b"x" * 32))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    holdout_mask(data, fraction=0.3, key=KEY)
    assert torch.equal(torch.rand(3), expected)  # the global RNG is untouched


def test_zero_fraction_holds_out_nothing_and_images_keep_their_shape(builtins: dict[str, PreparedData]) -> None:
    train, holdout = split_holdout(_indexed(37), fraction=0.0, key=KEY)
    assert (len(train), len(holdout)) == (37, 0)
    assert tuple(holdout.tensors[0].shape) == (0, 1)
    train, holdout = split_holdout(builtins["digits"], fraction=0.2, key=KEY)
    assert tuple(train.tensors[0].shape)[1:] == tuple(holdout.tensors[0].shape)[1:] == (1, 8, 8)
    assert len(train) + len(holdout) == 1797
