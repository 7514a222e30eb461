"""Writes examples/federated/data/hospital-{a,b,c}.csv: the built-in flchain cohort (serum free light chains,
Dispenzieri et al. 2012, shipped with scikit-survival) split into three 'hospitals' by a PUBLIC attribute, the
patient's age band at sampling: hospital-a < 60, hospital-b 60-69, hospital-c >= 70. The split is deterministic and
uses no statistic of the data; each hospital's declared size (its PrivateDataset's numExamples) is public metadata.

The bands make the hospitals differ the way real ones do (older patients, more deaths), so a federation has to
combine unlike sites. `chapter` (cause of death) and `futime` (follow-up) are left out: they reveal the label.
Run: python examples/federated/make_hospitals.py
"""

from __future__ import annotations

from pathlib import Path

from sksurv.datasets import load_flchain

BANDS = {"hospital-a": (0, 60), "hospital-b": (60, 70), "hospital-c": (70, 200)}


def main() -> None:
    features, outcome = load_flchain()
    frame = features[["age", "sex", "kappa", "lambda", "creatinine", "mgus"]].copy()
    frame["sex"] = (frame["sex"] == "M").astype(int)
    frame["mgus"] = (frame["mgus"] == "yes").astype(int)
    frame["creatinine"] = frame["creatinine"].fillna(1.0)  # a normal adult value (public), as the built-in loader does
    frame["death"] = outcome["death"].astype(int)
    out = Path(__file__).with_name("data")
    out.mkdir(exist_ok=True)
    for hospital, (low, high) in BANDS.items():
        part = frame[(frame["age"] >= low) & (frame["age"] < high)]
        path = out / f"{hospital}.csv"
        part.to_csv(path, index=False, float_format="%.3f")
        print(f"wrote {path}: {len(part)} rows")


if __name__ == "__main__":
    main()
