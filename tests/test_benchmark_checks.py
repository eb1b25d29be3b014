"""benchmarks/simulation.py refuses to report timings of a contender that did other work."""

import numpy as np
from benchmarks.simulation import (
    FINAL_TOLERANCE,
    ROUND1_TOLERANCE,
    EngineResult,
    same_work_checks,
)


def _result(name: str, round1: np.ndarray | None, final: np.ndarray | None) -> EngineResult:
    return EngineResult(name, 1.0, [1.0, 1.0], weights_round1=round1, weights_final=final)


def test_every_contender_is_checked_against_the_floor() -> None:
    w = np.zeros(4, dtype=np.float32)
    off = w + 10 * FINAL_TOLERANCE
    stopped = _result("stopped", None, None)
    stopped.stopped = "over budget"
    results = {
        "bare_1": _result("floor", w, w),
        "inprocess_1": _result("in-process", w, w + 1e-7),
        "vectorized": _result("vectorized", w, off),
        "flower_message": _result("Flower", None, w),
        "ray": _result("fedloom on Ray", w + 10 * ROUND1_TOLERANCE, w),
        "ray_vectorized": _result("fedloom on Ray, vectorized", w, off),
        "bare_default": stopped,
    }
    checks, failures = same_work_checks(results, "bare_1")
    assert checks["final_inprocess_1_vs_floor"] <= FINAL_TOLERANCE
    assert "final_bare_default_vs_floor" not in checks  # stopped: no ratio is printed either
    assert len(failures) == 4
    assert failures[0].startswith("vectorized differs from the floor after the last round")
    assert failures[1].startswith("Flower differs from the floor after round 1 (nan")
    assert failures[2].startswith("fedloom on Ray differs from the floor after round 1")
    assert failures[3].startswith(
        "fedloom on Ray, vectorized differs from the floor after the last"
    )
    assert same_work_checks({"bare_1": results["bare_1"]}, "bare_1") == ({}, [])


def test_deployment_part_with_failed_transfer_or_client_errors_is_not_measured() -> None:
    from benchmarks.deployment import FedloomRun, run_problems

    clean = FedloomRun(
        {"rounds": [{"ok": 3, "seconds": 1.0}], "rejected": {}},
        [{"tasks": 3, "errors": [], "n_errors": 0}],
    )
    assert run_problems(clean, 3) == []
    broken = FedloomRun(
        {"rounds": [{"ok": 3}, {"ok": 1}], "rejected": {"bad token": 2}},
        [
            {"tasks": 2, "errors": ["ConnectionError: reset"], "n_errors": 1},
            {"hung": True, "tail": ["retrying"]},
        ],
    )
    problems = run_problems(broken, 3)
    assert problems == [
        "round 2: 2 of 3 updates failed",
        "1 client(s) reported errors, e.g. ConnectionError: reset",
        "a client process never finished: retrying",
        "the server rejected 2 messages from honest clients",
    ]
