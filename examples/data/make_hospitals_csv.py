"""Regenerate examples/data/hospitals.csv from scikit-learn's embedded breast-cancer data.

Each row gets a "site" (hospital) drawn with a label-dependent mix, so the natural
split by site is non-IID, as real hospitals' case mixes are.
"""

import csv
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer


def main() -> None:
    d = load_breast_cancer()
    rng = np.random.default_rng(0)
    sites = ["north", "south", "east", "west"]
    probs_by_label = {0: [0.5, 0.3, 0.1, 0.1], 1: [0.1, 0.2, 0.35, 0.35]}
    out = Path(__file__).with_name("hospitals.csv")
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["site", *[n.replace(" ", "_") for n in d.feature_names], "diagnosis"])
        for x, y in zip(d.data, d.target, strict=True):
            site = sites[rng.choice(4, p=probs_by_label[int(y)])]
            w.writerow([site, *[f"{v:.6g}" for v in x], ["malignant", "benign"][y]])


if __name__ == "__main__":
    main()
