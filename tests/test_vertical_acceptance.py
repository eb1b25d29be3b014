"""Issue 13, acceptance 1 (vertical half), on digits split into left and right halves:
each party alone < split learning ≈ the centralized network (within 1 point)."""

from __future__ import annotations

from fedloom.config import VerticalConfig
from fedloom.vertical.data import build_vertical_dataset, join_by_plain_ids, train_test_rows
from fedloom.vertical.runner import make_trainer, measure_baselines, standardize


def test_digits_halves_alone_are_worse_than_vertical_which_matches_centralized() -> None:
    v = VerticalConfig(dataset="digits", bottom_hidden=[32], embedding_dim=16, top_hidden=[32])
    rounds = 5
    data = build_vertical_dataset("digits", parties=2, coverage=0.95, seed=0)
    y, xs = join_by_plain_ids(data)  # the PSI's result (test_vertical_psi checks they agree)
    train_rows, test_rows = train_test_rows(len(y), test_fraction=0.25, seed=0)
    xs = [standardize(x, train_rows) for x in xs]
    trainer = make_trainer(v, y, xs, train_rows, test_rows, data.num_classes, 0)
    for _ in range(rounds):
        trainer.run_round()
    vertical = trainer.evaluate()["accuracy"]
    base = measure_baselines(v, y, xs, train_rows, test_rows, data.num_classes, 0, rounds)
    assert max(base["feature_party_alone"]) + 0.02 < vertical
    assert abs(vertical - base["centralized_same_network"]) <= 0.01
    assert base["label_party_alone"] < 0.2
