"""Writes examples/data/flchain-cohort.csv: the serum free light chain cohort (Dispenzieri et al. 2012,
public, shipped with scikit-survival) as a CSV file standing in for a hospital's export.

Rows with a missing creatinine value are dropped (a real export would be cleaned the same way);
`chapter` (cause of death) and `futime` (follow-up time) are left out because they leak the label.
Run: python examples/data/make_cohort_csv.py
"""

from __future__ import annotations

from pathlib import Path

from sksurv.datasets import load_flchain


def main() -> None:
    features, outcome = load_flchain()
    frame = features[["age", "sex", "kappa", "lambda", "creatinine", "mgus"]].copy()
    frame["sex"] = (frame["sex"] == "M").astype(int)
    frame["mgus"] = (frame["mgus"] == "yes").astype(int)
    frame["death"] = outcome["death"].astype(int)
    frame = frame.dropna()
    out = Path(__file__).with_name("flchain-cohort.csv")
    frame.to_csv(out, index=False, float_format="%.3f")
    print(f"wrote {out}: {len(frame)} rows")


if __name__ == "__main__":
    main()
