"""``fedloom estimate`` against a real deployment on loopback whose clients rehearse the
``[system]`` device profiles (issue 11, acceptance 3's second check).

The devices are slow on purpose (rounds of about 3.6 s, almost all of it the rehearsal's
sleeps), so the real overheads of a busy machine (gRPC, the server's processing, real
training of a tiny model) stay small beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedloom.store import RunStore

from .deploy_helpers import fedloom, set_args

ROUNDS = 4
CLIENTS = 3
CONFIG = [
    f"rounds={ROUNDS}",
    f"data.num_clients={CLIENTS}",
    f"server.min_fit_clients={CLIENTS}",  # every round waits for, and samples, all three
    "model.name=logreg",
    "client.steps=5",
    "client.batch_size=16",
    f"eval.every={ROUNDS}",
    "system.enabled=true",
    "system.s_per_example=0.02",
    "system.compute_sigma=1.0",
    "system.uplink_mbps=0.02",
    "system.downlink_mbps=0.1",
    "system.bandwidth_sigma=0.5",
    "deploy.heartbeat_interval_s=0.5",
    "deploy.heartbeat_timeout_s=10",
    "deploy.poll_timeout_s=1",
]


@pytest.mark.slow
def test_estimate_is_within_25_percent_of_a_rehearsing_deployment(procs, tmp_path: Path) -> None:
    from fedloom.cli import main

    estimate_json = tmp_path / "estimate.json"
    args = ["estimate", *set_args(CONFIG), "--trajectories", "20", "--no-what-if"]
    assert main([*args, "--json", str(estimate_json)]) == 0
    per_round = json.loads(estimate_json.read_text())["estimates"][0]["mean_round_s"]
    assert len(per_round) == ROUNDS and min(per_round) > 2.0  # sleeps dominate overheads

    run = tmp_path / "run"
    server = procs(
        fedloom(
            "server",
            "--address",
            "127.0.0.1:0",
            "--insecure",
            "--allow-anonymous",
            "--out",
            str(run),
            *set_args(CONFIG),
        )
    )
    port = int(server.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    clients = [
        procs(
            fedloom(
                "client",
                "--server",
                f"127.0.0.1:{port}",
                "--insecure",
                "--partition",
                str(i),
                "--rehearse-profile",
            )
        )
        for i in range(CLIENTS)
    ]
    assert server.wait(240) == 0, server.output
    for c in clients:
        assert c.wait(60) == 0, c.output
    with RunStore.open(run) as store:
        history = store.history()
        recorded = store.round_times()
    assert [r["clients_succeeded"] for r in history] == [CLIENTS] * ROUNDS
    # The server's own virtual clock times the real results exactly as the estimate did.
    assert [r["sim_round_s"] for r in history] == pytest.approx(per_round, rel=1e-6)
    # Wall time from the end of round 1 to the end of the last round: round 1 also holds
    # the clients' start-up and registration, which the estimate does not model.
    measured = recorded[-1][1] - recorded[0][1]
    estimated = sum(per_round[1:])
    ratio = measured / estimated
    print(
        f"rounds 2-{ROUNDS}: deployment {measured:.2f} s, estimate {estimated:.2f} s, "
        f"ratio {ratio:.3f}"
    )
    assert 0.75 <= ratio <= 1.25, (measured, estimated)


@pytest.mark.parametrize(
    "overrides",
    [
        ["compression.kind=topk", "compression.ratio=0.1", "compression.downlink=float16"],
        ["strategy=scaffold"],
    ],
)
def test_estimate_bytes_are_the_strategys_wire_sizes(overrides: list[str]) -> None:
    import numpy as np

    from fedloom.config import load_config
    from fedloom.data import build_federated_dataset
    from fedloom.strategies import build_learner, build_strategy, traffic_bytes

    cfg = load_config(None, ["data.num_clients=3", "model.name=logreg", *overrides])
    spec = build_learner(cfg, build_federated_dataset(cfg.data, cfg.seed)).binding.spec
    strategy = build_strategy(cfg, num_clients=3, spec=spec, roles_in_process=True)
    down = sum(
        v.nbytes for v in strategy.encoded_broadcast(np.zeros(spec.size, np.float32)).values()
    )
    up = sum(n * np.dtype(dt).itemsize for n, dt in strategy.wire_layout().values())
    assert traffic_bytes(cfg, num_clients=3, spec=spec) == (down, up)


def test_estimate_runs_for_an_aggregator_that_needs_server_data(tmp_path: Path) -> None:
    from fedloom.cli import main

    out = tmp_path / "estimate.json"
    sets = set_args(["server.aggregator=fltrust", "system.enabled=true", "rounds=2"])
    assert main(["estimate", *sets, "--trajectories", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["estimates"][0]["total_s_this_seed"] > 0
