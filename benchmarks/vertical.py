"""Vertical FL tables for the README: accuracy per party vs split learning vs centralized,
and label leakage (Li et al. 2022) without and with defenses.

    PYTHONPATH=src python benchmarks/vertical.py [--rounds 20] [--seeds 0 1 2] [--out FILE]

Breast cancer (binary: the leakage attacks apply) is aligned by the real DH-PSI once per
seed; digits (1797 records) is aligned by joining the plain ids instead, to save the PSI's
~14,000 modular exponentiations: the PSI returns exactly that join (tests/test_vertical_psi.py),
so the training numbers are the same. Each setting uses the example configs' models and
optimizers (Adam, lr 0.01, one round = one epoch, batch 32).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.config import VerticalConfig
from fedloom.vertical.data import build_vertical_dataset, join_by_plain_ids, train_test_rows
from fedloom.vertical.runner import aligned_parties, make_trainer, measure_baselines, standardize


def setting(v: VerticalConfig, seed: int, rounds: int, psi: bool) -> dict[str, Any]:
    data = build_vertical_dataset(
        v.dataset, parties=v.feature_parties, coverage=v.id_coverage, seed=seed
    )
    if psi:
        y, xs, alignment = aligned_parties(data)
    else:
        (y, xs), alignment = join_by_plain_ids(data), None
    train_rows, test_rows = train_test_rows(len(y), test_fraction=v.test_fraction, seed=seed)
    xs = [standardize(x, train_rows) for x in xs]
    out: dict[str, Any] = {"alignment": alignment, "records": len(y)}
    out["baselines"] = measure_baselines(
        v, y, xs, train_rows, test_rows, data.num_classes, seed, rounds
    )
    runs = {}
    defenses = [("none", 1.0)]
    if data.num_classes == 2:
        defenses += [("noise", 0.5), ("noise", 1.0), ("noise", 2.0), ("max_norm", 1.0)]
    for defense, scale in defenses:
        vv = v.model_copy(update={"defense": defense, "noise_scale": scale})
        trainer = make_trainer(vv, y, xs, train_rows, test_rows, data.num_classes, seed)
        hist = [trainer.run_round() for _ in range(rounds)]
        final = trainer.evaluate()
        row: dict[str, Any] = {"accuracy": final["accuracy"]}
        if "leak_norm_auc" in hist[0]:
            row["norm_auc"] = float(np.mean([h["leak_norm_auc"] for h in hist]))
            row["cosine_auc"] = float(np.mean([h["leak_cosine_auc"] for h in hist]))
        runs[f"{defense}" + (f"@{scale}" if defense == "noise" else "")] = row
    out["split"] = runs
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("vertical_results.json"))
    args = ap.parse_args()
    bc = VerticalConfig(
        dataset="breast_cancer", bottom_hidden=[16], embedding_dim=8, top_hidden=[16]
    )
    dg = VerticalConfig(dataset="digits", bottom_hidden=[32], embedding_dim=16, top_hidden=[32])
    results = {}
    for name, v, psi in (("breast_cancer", bc, True), ("digits", dg, False)):
        results[name] = {str(s): setting(v, s, args.rounds, psi) for s in args.seeds}
        args.out.write_text(json.dumps(results, indent=2))
        print(name, json.dumps(results[name], indent=1))


if __name__ == "__main__":
    main()
