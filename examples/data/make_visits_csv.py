"""Writes examples/data/flchain-visits.csv: the serum free light chain cohort (Dispenzieri et al. 2012, public,
shipped with scikit-survival) reshaped like a hospital's EHR export, with a row per clinic visit.

Each patient (patient_id P00001, ...) gets 1 to 8 visits (more for sicker patients: the number of visits is not
independent of the outcome, as in real records). A visit's age is the patient's age plus the years since the
first visit; its kappa, lambda and creatinine are the patient's values with a visit-to-visit variation of about
10 % (log-normal), as repeated lab panels vary. The outcome (death during follow-up) is the patient's, on every
row. Rows with a missing creatinine value are dropped, and `chapter` and `futime` are left out (they leak the
label), as in make_cohort_csv.py. Fixed seed: the file is reproducible.

Run: python examples/data/make_visits_csv.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sksurv.datasets import load_flchain

SEED = 20261207
MAX_VISITS = 8


def main() -> None:
    features, outcome = load_flchain()
    frame = features[["age", "sex", "kappa", "lambda", "creatinine", "mgus"]].copy()
    frame["sex"] = (frame["sex"] == "M").astype(int)
    frame["mgus"] = (frame["mgus"] == "yes").astype(int)
    frame["death"] = outcome["death"].astype(int)
    frame = frame.dropna().reset_index(drop=True)
    rng = np.random.default_rng(SEED)
    # Sicker patients come more often: 1 + Poisson(1.5), or 1 + Poisson(3) for those who died; at most 8.
    visits = np.minimum(1 + rng.poisson(np.where(frame["death"] == 1, 3.0, 1.5)), MAX_VISITS)
    rows = []
    for index, patient in frame.iterrows():
        years = np.sort(rng.uniform(0.0, 4.0, size=visits[index]))
        years[0] = 0.0
        for year in years:
            lab = np.exp(rng.normal(0.0, 0.1, size=3))
            rows.append(
                (
                    f"P{index + 1:05d}",
                    patient["age"] + year,
                    int(patient["sex"]),
                    patient["kappa"] * lab[0],
                    patient["lambda"] * lab[1],
                    patient["creatinine"] * lab[2],
                    int(patient["mgus"]),
                    int(patient["death"]),
                )
            )
    out = Path(__file__).with_name("flchain-visits.csv")
    with out.open("w") as handle:
        handle.write("patient_id,age,sex,kappa,lambda,creatinine,mgus,death\n")
        for row in rows:
            handle.write(f"{row[0]},{row[1]:.2f},{row[2]},{row[3]:.3f},{row[4]:.3f},{row[5]:.3f},{row[6]},{row[7]}\n")
    print(f"wrote {out}: {len(rows)} rows, {len(frame)} patients, at most {int(visits.max())} rows per patient")


if __name__ == "__main__":
    main()
