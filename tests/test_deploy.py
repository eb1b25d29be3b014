"""The real deployment, with real processes on 127.0.0.1: TLS, tokens, faults, resume."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedloom.config import load_config
from fedloom.engine.grpc.auth import add_token
from fedloom.engine.grpc.certs import make_dev_certs
from fedloom.engine.simulation import run_simulation
from fedloom.store import RunStore

from .deploy_helpers import (
    Proc,
    fedloom,
    free_port,
    key_guarded_server,
    mtls_client_args,
    mtls_server_args,
    set_args,
    slow_client,
)

FAST = [
    "client.epochs=1",
    "deploy.heartbeat_interval_s=0.5",
    "deploy.heartbeat_timeout_s=6",
    "deploy.poll_timeout_s=1",
    "deploy.wait_for_clients_s=300",
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | list[str]]:
    base = tmp_path_factory.mktemp("pki")
    make_dev_certs(base / "certs", ["localhost", "127.0.0.1"], ["client-0"])
    make_dev_certs(base / "other", ["localhost", "127.0.0.1"], [])  # an untrusted CA
    tokens = base / "tokens.txt"
    names = [add_token(tokens, f"client-{i}") for i in range(5)]
    key_holder = add_token(tokens, "key-holder")
    return {"dir": base, "tokens": tokens, "plain": names, "key_holder": key_holder}


def _server_args(
    pki: dict, out: Path, overrides: list[str], port: int = 0, resume: bool = False
) -> list[str]:
    """``fedloom server`` with TLS and tokens: a new run in ``out``, or ``--resume out``."""
    certs = Path(pki["dir"]) / "certs"
    run = ["--resume", str(out)] if resume else ["--out", str(out), *set_args(overrides)]
    return fedloom(
        "server",
        "--address",
        f"127.0.0.1:{port}",
        "--tls-cert",
        str(certs / "server.pem"),
        "--tls-key",
        str(certs / "server.key"),
        "--tokens",
        str(pki["tokens"]),
        *run,
    )


def _client_args(pki: dict, port: int, i: int, token: str | None = None) -> list[str]:
    certs = Path(pki["dir"]) / "certs"
    return [
        "--server",
        f"localhost:{port}",
        "--root-cert",
        str(certs / "ca.pem"),
        "--token",
        token if token is not None else pki["plain"][i],
        "--partition",
        str(i),
    ]


def _clients(procs: Callable[[list[str]], Proc], pki: dict, port: int, n: int) -> list[Proc]:
    """``fedloom client`` processes for partitions 0..n-1, each with its own token."""
    return [procs(fedloom("client", *_client_args(pki, port, i))) for i in range(n)]


def _port(server: Proc) -> int:
    return int(server.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))


def _history(out: Path) -> list[dict]:
    return json.loads((out / "summary.json").read_text())["history"]


DP = [
    "strategy=dp-fedavg",
    "privacy.noise_multiplier=0.3",
    "privacy.adaptive_clipping=true",
    "privacy.clipped_count_stddev=1.0",
    "server.sampling=fixed",
    "privacy.secure_noise=false",  # seeded noise, so the deployment can equal the simulation
]


def test_deployment_draws_dp_noise_from_the_csprng_by_default(
    pki: dict, procs, tmp_path: Path
) -> None:
    server = procs(
        _server_args(
            pki, tmp_path / "run", ["strategy=dp-fedavg", "privacy.noise_multiplier=1.0", *FAST]
        )
    )
    _port(server)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["privacy"]["secure_noise"] is True


@pytest.mark.parametrize("extra", [[], DP], ids=["fedavg", "dp-fedavg-adaptive"])
def test_tls_tokens_three_clients_equal_simulation(
    pki: dict, procs, tmp_path: Path, extra: list[str]
) -> None:
    overrides = ["rounds=3", "data.num_clients=3", "server.min_fit_clients=3", *FAST, *extra]
    server = procs(_server_args(pki, tmp_path / "deploy", overrides))
    port = _port(server)
    clients = _clients(procs, pki, port, 3)
    assert server.wait(180) == 0, server.output
    for c in clients:
        assert c.wait(60) == 0, c.output
        assert "completed 3 tasks" in c.output

    with RunStore.open(tmp_path / "deploy") as store:
        ckpt = store.latest_checkpoint()
    assert ckpt is not None and ckpt.round == 3
    run_simulation(load_config(None, overrides), tmp_path / "sim")
    with RunStore.open(tmp_path / "sim") as store:
        sim = store.latest_checkpoint()
    assert sim is not None
    np.testing.assert_allclose(ckpt.tensors["global"], sim.tensors["global"], atol=1e-6)
    deploy_hist, sim_hist = _history(tmp_path / "deploy"), _history(tmp_path / "sim")
    assert [r["accuracy"] for r in deploy_hist] == pytest.approx([r["accuracy"] for r in sim_hist])


def test_client_killed_mid_round_does_not_stop_it(pki: dict, procs, tmp_path: Path) -> None:
    overrides = ["rounds=4", "data.num_clients=4", "server.min_fit_clients=3", *FAST]
    server = procs(_server_args(pki, tmp_path / "run", overrides))
    port = _port(server)
    clients = [procs(slow_client(1.5, *_client_args(pki, port, i))) for i in range(4)]
    server.wait_for(r"^round 1:", timeout=300)
    os.kill(clients[3].popen.pid, signal.SIGKILL)  # round 2 is under way: all four train
    assert server.wait(180) == 0, server.output
    history = _history(tmp_path / "run")
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    assert history[1]["clients_failed"] == 1 and history[1]["clients_succeeded"] == 3
    assert all(r["clients_sampled"] == 3 for r in history[2:])  # the dead client is not sampled
    with RunStore.open(tmp_path / "run") as store:
        assert any("client lost" in f["error"] for f in store.failures(2))


@pytest.mark.slow
def test_straggler_beyond_deadline_is_excluded_and_counted(
    pki: dict, procs, tmp_path: Path
) -> None:
    overrides = [
        "rounds=2",
        "data.num_clients=3",
        "server.min_fit_clients=3",
        "deploy.round_timeout_s=4",
        *FAST,
    ]
    server = procs(_server_args(pki, tmp_path / "run", overrides))
    port = _port(server)
    _clients(procs, pki, port, 2)
    procs(slow_client(8.0, *_client_args(pki, port, 2)))
    assert server.wait(180) == 0, server.output
    history = _history(tmp_path / "run")
    for rec in history:
        assert rec["stragglers_dropped"] == 1 and rec["clients_succeeded"] == 2
    assert history[1]["rejected_by_reason"].get("deadline_missed", 0) >= 1


def test_server_killed_after_round_2_resumes_to_round_5(pki: dict, procs, tmp_path: Path) -> None:
    overrides = ["rounds=5", "data.num_clients=3", "server.min_fit_clients=3", *FAST]
    port = free_port()
    out = tmp_path / "run"
    server = procs(_server_args(pki, out, overrides, port))
    _port(server)
    clients = [procs(slow_client(0.5, *_client_args(pki, port, i))) for i in range(3)]
    server.wait_for(r"^round 2:", timeout=300)
    server.kill()
    resumed = procs(_server_args(pki, out, [], port, resume=True))
    assert resumed.wait(240) == 0, resumed.output
    history = _history(out)
    assert [r["round"] for r in history] == [1, 2, 3, 4, 5]
    for c in clients:
        assert c.wait(60) == 0, c.output


def test_wrong_token_is_refused_with_a_clear_message(pki: dict, procs, tmp_path: Path) -> None:
    server = procs(_server_args(pki, tmp_path / "run", ["rounds=1", *FAST]))
    port = _port(server)
    bad = procs(fedloom("client", *_client_args(pki, port, 0, token="not-a-token")))
    assert bad.wait(60) == 2
    assert "refused by the server: token refused" in bad.output
    server.wait_for(r"rejected \(bad_token\)")
    assert server.popen.poll() is None  # the server goes on


def test_untrusted_server_certificate_is_refused(pki: dict, procs, tmp_path: Path) -> None:
    server = procs(_server_args(pki, tmp_path / "run", ["rounds=1", *FAST]))
    port = _port(server)
    args = _client_args(pki, port, 0)
    args[args.index("--root-cert") + 1] = str(Path(pki["dir"]) / "other" / "ca.pem")
    bad = procs(fedloom("client", *args, "--max-wait", "20"))
    assert bad.wait(60) == 2
    assert "TLS handshake failed" in bad.output and "Traceback" not in bad.output


def test_mutual_tls_requires_a_client_certificate(pki: dict, procs, tmp_path: Path) -> None:
    certs = Path(pki["dir"]) / "certs"
    server = procs(
        fedloom(
            "server",
            "--address",
            "127.0.0.1:0",
            *mtls_server_args(certs),
            "--out",
            str(tmp_path / "run"),
            *set_args(["rounds=1", "data.num_clients=1", "server.min_fit_clients=1", *FAST]),
        )
    )
    port = _port(server)
    common = ["--server", f"localhost:{port}", "--partition", "0", "--max-wait", "20"]
    anonymous = procs(fedloom("client", *common, "--root-cert", str(certs / "ca.pem")))
    assert anonymous.wait(60) == 2
    assert "requires a client certificate" in anonymous.output, anonymous.output
    good = procs(fedloom("client", *common, *mtls_client_args(certs, "client-0")))
    assert good.wait(120) == 0, good.output
    assert server.wait(60) == 0


def _site_files(tmp_path: Path) -> list[Path]:
    import csv

    rows = list(csv.reader((Path(__file__).parents[1] / "examples/data/hospitals.csv").open()))
    paths = []
    for site in ("north", "south"):
        path = tmp_path / f"{site}.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(rows[0])
            w.writerows(r for r in rows[1:] if r[0] == site)
        paths.append(path)
    return paths


def test_clients_train_on_their_own_csv_files(procs, tmp_path: Path) -> None:
    sites = _site_files(tmp_path)
    sets = ["rounds=2", "server.min_fit_clients=2", "eval.federated=true", *FAST]
    server = procs(
        fedloom(
            "server",
            "examples/csv_hospitals.toml",
            "--address",
            "127.0.0.1:0",
            "--out",
            str(tmp_path / "run"),
            *set_args(sets),
        )
    )
    port = _port(server)
    clients = [
        procs(fedloom("client", "--server", f"127.0.0.1:{port}", "--insecure", "--data", str(p)))
        for p in sites
    ]
    assert server.wait(180) == 0, server.output
    for c in clients:
        assert c.wait(60) == 0, c.output
    history = _history(tmp_path / "run")
    assert all(r["clients_succeeded"] == 2 for r in history)
    assert history[-1]["fed_accuracy"] is not None and history[-1]["accuracy"] > 0.7


def test_own_csv_needs_pinned_classes(procs, tmp_path: Path) -> None:
    sites = _site_files(tmp_path)
    example = (Path(__file__).parents[1] / "examples/csv_hospitals.toml").read_text()
    unpinned = tmp_path / "unpinned.toml"
    unpinned.write_text("\n".join(x for x in example.splitlines() if not x.startswith("classes")))
    root = Path(__file__).parents[1]
    sets = [
        "rounds=1",
        "server.min_fit_clients=1",
        "deploy.wait_for_clients_s=30",
        f"data.path='{root / 'examples/data/hospitals.csv'}'",
    ]
    server = procs(
        fedloom(
            "server",
            str(unpinned),
            "--address",
            "127.0.0.1:0",
            "--out",
            str(tmp_path / "run"),
            *set_args(sets),
        )
    )
    port = _port(server)
    client = procs(
        fedloom("client", "--server", f"127.0.0.1:{port}", "--insecure", "--data", str(sites[0]))
    )
    assert client.wait(60) == 2
    assert "does not pin data.classes" in client.output, client.output


@pytest.mark.slow
def test_secagg_over_grpc_survives_a_client_killed_mid_protocol(
    pki: dict, procs, tmp_path: Path
) -> None:
    """SecAgg+ with 5 real client processes; one is SIGKILLed during the share-keys stage."""
    overrides = [
        "rounds=1",
        "data.num_clients=5",
        "server.min_fit_clients=5",
        "privacy.secure_aggregation=secagg+",
        "privacy.secagg_clip_range=4.0",
        *FAST,
    ]
    server = procs(_server_args(pki, tmp_path / "run", overrides))
    port = _port(server)
    _clients(procs, pki, port, 4)
    victim = procs(slow_client(0.0, *_client_args(pki, port, 4), "--secagg-stall", "share_keys"))
    victim.wait_for(r"secagg stage share_keys reached", timeout=120)
    os.kill(victim.popen.pid, signal.SIGKILL)
    assert server.wait(180) == 0, server.output
    (record,) = _history(tmp_path / "run")
    assert record["aggregated"] and record["clients_sampled"] == 5
    assert record["secagg_contributors"] == 4  # the victim dropped; its masks were removed
    assert record["accuracy"] > 0.2  # one round from chance (0.1) on digits


def _key_holder_args(pki: dict, port: int, token: str) -> list[str]:
    return [*_client_args(pki, port, 0, token)[:-2], "--key-holder", "--name", "kh"]


CKKS = ["privacy.secure_aggregation=ckks", "privacy.secagg_clip_range=4.0"]


def test_ckks_over_grpc_equals_simulation_and_the_server_holds_no_secret_key(
    pki: dict, procs, tmp_path: Path
) -> None:
    """3 clients and a key holder process over TLS; the server cannot make or load a key."""
    pytest.importorskip("tenseal", reason="CKKS needs the 'he' extra (TenSEAL)")
    overrides = ["rounds=2", "data.num_clients=3", "server.min_fit_clients=3", *CKKS, *FAST]
    server = procs(key_guarded_server(*_server_args(pki, tmp_path / "deploy", overrides)[3:]))
    port = _port(server)
    impostor = procs(fedloom("client", *_key_holder_args(pki, port, pki["plain"][0])))
    assert impostor.wait(60) == 2
    assert "is not this run's key-holder ('key-holder')" in impostor.output, impostor.output
    clients = _clients(procs, pki, port, 3)
    holder = procs(fedloom("client", *_key_holder_args(pki, port, pki["key_holder"])))
    assert server.wait(180) == 0, server.output
    assert holder.wait(60) == 0 and "completed 4 tasks" in holder.output  # 2 × keygen, decrypt
    for c in clients:
        assert c.wait(60) == 0, c.output
    assert "contexts loaded: " in server.output
    loaded = server.wait_for(r"contexts loaded: (\d+) public, (\d+) with a secret key")
    assert int(loaded.group(1)) >= 2 and int(loaded.group(2)) == 0

    history = _history(tmp_path / "deploy")
    assert [r["secagg_contributors"] for r in history] == [3, 3]
    with RunStore.open(tmp_path / "deploy") as store:
        ckpt = store.latest_checkpoint()
    run_simulation(load_config(None, overrides), tmp_path / "sim")
    with RunStore.open(tmp_path / "sim") as store:
        sim = store.latest_checkpoint()
    assert ckpt is not None and sim is not None
    np.testing.assert_allclose(ckpt.tensors["global"], sim.tensors["global"], atol=1e-5)


@pytest.mark.slow
def test_ckks_round_completes_without_a_client_killed_at_the_encrypt_stage(
    pki: dict, procs, tmp_path: Path
) -> None:
    pytest.importorskip("tenseal", reason="CKKS needs the 'he' extra (TenSEAL)")
    overrides = [
        "rounds=1",
        "data.num_clients=4",
        "server.min_fit_clients=4",
        "deploy.round_timeout_s=60",
        *CKKS,
        *FAST,
        "deploy.heartbeat_timeout_s=12",  # a busy machine must not drop a healthy client
    ]
    server = procs(_server_args(pki, tmp_path / "run", overrides))
    port = _port(server)
    procs(fedloom("client", *_key_holder_args(pki, port, pki["key_holder"])))
    _clients(procs, pki, port, 3)
    victim = procs(slow_client(0.0, *_client_args(pki, port, 3), "--he-stall"))
    victim.wait_for("ckks encrypt stage reached", timeout=120)
    os.kill(victim.popen.pid, signal.SIGKILL)
    assert server.wait(180) == 0, server.output
    (record,) = _history(tmp_path / "run")
    assert record["aggregated"] and record["clients_sampled"] == 4
    assert record["secagg_contributors"] == 3, server.output
    assert record["accuracy"] > 0.2  # one round from chance (0.1) on digits


LOCAL_DP = [
    "privacy.local_dp=true",
    "privacy.local_noise_multiplier=1.1",
    "privacy.local_delta=1e-5",
    "data.partition='iid'",  # equal partitions: both clients spend ε alike per round
]


@pytest.mark.slow
def test_restarted_client_keeps_its_local_dp_budget(pki: dict, procs, tmp_path: Path) -> None:
    """Client 1 is SIGKILLed after round 1 and restarted with the same --state-dir.

    It sits out round 2 (its task dies with it) and trains in round 3: its ε then counts
    two rounds, above round 1's and equal to the uninterrupted client 0's after its two.
    Both clients share the folder; each has its own file.
    """
    overrides = ["rounds=3", "data.num_clients=2", "server.min_fit_clients=2", *FAST, *LOCAL_DP]
    state = ["--state-dir", str(tmp_path / "state")]
    server = procs(_server_args(pki, tmp_path / "run", overrides))
    port = _port(server)
    procs(fedloom("client", *_client_args(pki, port, 0), *state))
    victim = procs(slow_client(4.0, *_client_args(pki, port, 1), *state))
    server.wait_for(r"^round 1:", timeout=300)
    os.kill(victim.popen.pid, signal.SIGKILL)  # waiting out round 2's delay, untrained
    (ledger_file,) = (tmp_path / "state").glob("partition-1-*.json")
    ((sigma, q, steps),) = json.loads(ledger_file.read_text())["meta"]["local_dp"]
    # The killed process's session is still on the server until its heartbeat timeout;
    # --replace-stale takes it over (its heartbeats have stopped), never a live one.
    restarted = procs(
        fedloom("client", *_client_args(pki, port, 1), *state, "--replace-stale", "-v")
    )
    assert server.wait(180) == 0, server.output
    assert restarted.wait(60) == 0, restarted.output
    assert "resumed this client's state from" in restarted.output

    history = _history(tmp_path / "run")
    assert [r["clients_succeeded"] for r in history] == [2, 1, 2]
    eps_round_1 = history[0]["local_epsilon_max"]  # each client after one round
    eps_uninterrupted = history[1]["local_epsilon_max"]  # client 0 after two rounds
    reported = restarted.wait_for(r"round 3: local DP epsilon spent by this client so far: (\S+)")
    assert float(reported.group(1)) > 1.1 * eps_round_1  # a fresh ledger would equal it
    assert float(reported.group(1)) == pytest.approx(eps_uninterrupted, rel=1e-5)
    assert json.loads(ledger_file.read_text())["meta"]["local_dp"] == [[sigma, q, 2 * steps]]
    assert len(list((tmp_path / "state").glob("partition-0-*.json"))) == 1


def test_scaffold_deployment_equals_simulation(pki: dict, procs, tmp_path: Path) -> None:
    """SCAFFOLD over gRPC: two named uploads (delta and the control-variate change), a
    broadcast beyond the global model, and each client's control variate kept in its own
    state file across rounds; the final model equals the simulation's."""
    from fedloom.registry import CLIENT_ALGORITHMS

    if "scaffold" not in CLIENT_ALGORITHMS:
        pytest.skip("SCAFFOLD is not registered yet")
    overrides = ["strategy=scaffold", "rounds=2", "data.num_clients=2", "server.min_fit_clients=2"]
    overrides += FAST
    state = ["--state-dir", str(tmp_path / "state")]
    server = procs(_server_args(pki, tmp_path / "deploy", overrides))
    port = _port(server)
    clients = [procs(fedloom("client", *_client_args(pki, port, i), *state)) for i in range(2)]
    assert server.wait(180) == 0, server.output
    for c in clients:
        assert c.wait(60) == 0, c.output
    assert len(list((tmp_path / "state").glob("partition-*.json"))) == 2  # c_i kept per site

    run_simulation(load_config(None, overrides), tmp_path / "sim")
    finals = []
    for name in ("deploy", "sim"):
        with RunStore.open(tmp_path / name) as store:
            ckpt = store.latest_checkpoint()
        assert ckpt is not None and ckpt.round == 2
        finals.append(ckpt.tensors["global"])
    np.testing.assert_allclose(finals[0], finals[1], atol=1e-5)
    assert all(r["clients_succeeded"] == 2 for r in _history(tmp_path / "deploy"))
