"""One gossip peer as its own process: train, push to neighbours, wait, mix, record.

The same algorithm as the simulation (``gossip/loop.py``: decentralized local SGD,
Koloskova et al. 2020, Algorithm 1; D-PSGD with one local step, Lian et al. 2017,
Algorithm 1; Metropolis–Hastings weights, Xiao & Boyd 2004, Eq. 9), with no process
that sees more than one peer's model and its neighbours'.

Synchronisation: *synchronous rounds with a timeout*, push-based. In round r a peer
trains from its model x_i to the half-step x_i^{r+½}, pushes it to each neighbour of
round r's graph (every peer computes the same graph from the seed), then waits until
its neighbours' round-r pushes have arrived, or ``round_timeout_s`` has passed, and
mixes x_i ← Σ_j W'_ij x_j^{r+½} with :func:`~fedloom.gossip.topology.renormalised_row`:
the weight of a neighbour that did not answer goes to the peer's own model. Because a
peer pushes *before* it waits, a slow peer finds its neighbours' models already in its
inbox; and because the inbox keeps a few rounds ahead, a fast peer's push is kept.
We chose this over asynchronous pulls because it computes exactly the simulation's
rounds when everyone answers (a test checks the accuracy against ``mode = "gossip"``),
and a missing neighbour changes only that round's row.

A dead neighbour must not stall anyone: the push to it fails at once (connection
refused), so the peer does not wait for it; one that dies after acknowledging is found
by a ping every ``probe_every_s`` while the peer waits (a refused ping ends the wait
for it). A neighbour that is alive but silent costs at most ``round_timeout_s`` per
round. A restarted or late peer is pushed to again every round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.gossip.topology import (
    consensus_distance,
    metropolis_hastings,
    renormalised_row,
    round_graph,
)
from fedloom.gossip.transport import (
    ACCEPTED,
    DUPLICATE,
    TIMEOUT,
    UNREACHABLE,
    Inbox,
    MessageLedger,
    Neighbours,
    encode_model,
)
from fedloom.store import Checkpoint, RunStore

log = logging.getLogger("fedloom.gossip.peer")

#: ``train(round, model) -> (half-step model, training metrics)``.
TrainFn = Callable[[int, np.ndarray], tuple[np.ndarray, dict[str, float]]]


@dataclass(frozen=True, kw_only=True)
class PeerSettings:
    peer_id: int
    num_peers: int
    rounds: int
    topology: str
    seed: int
    edge_probability: float = 0.3
    time_varying: bool = False
    #: Longest wait for a live neighbour's model in one round.
    round_timeout_s: float = 60.0
    #: Longest wait, before round 1, for the neighbours to listen.
    start_timeout_s: float = 120.0
    push_timeout_s: float = 10.0
    #: While waiting, ping the missing neighbours this often (a refused ping: gone).
    probe_every_s: float = 0.5


def neighbour_check(settings: PeerSettings) -> Callable[[int, int], bool]:
    """Whether a sender mixes with this peer in a round: the service's check, usable
    before the peer exists (it serves as soon as it listens)."""
    fixed = (
        None
        if settings.time_varying
        else round_graph(
            settings.topology,
            settings.num_peers,
            seed=settings.seed,
            rnd=0,
            edge_probability=settings.edge_probability,
        )
    )

    def check(sender: int, rnd: int) -> bool:
        s = settings
        if not (0 <= sender < s.num_peers and 1 <= rnd <= s.rounds):
            return False
        a = fixed
        if a is None:
            a = round_graph(
                s.topology,
                s.num_peers,
                seed=s.seed,
                rnd=rnd,
                edge_probability=s.edge_probability,
                time_varying=True,
            )
        return bool(a[s.peer_id, sender])

    return check


class GossipPeer:
    """Runs one peer's rounds; the model, graph and inbox stay in this process."""

    def __init__(
        self,
        *,
        settings: PeerSettings,
        neighbours: Neighbours,
        inbox: Inbox,
        ledger: MessageLedger,
        train: TrainFn,
        evaluate: Callable[[np.ndarray], dict[str, float]],
        store: RunStore,
        initial: np.ndarray,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.neighbours = neighbours
        self.inbox = inbox
        self.ledger = ledger
        self.train = train
        self.evaluate = evaluate
        self.store = store
        self.model = np.asarray(initial, dtype=np.float32).copy()
        self.on_round = on_round
        self._fixed = None if settings.time_varying else self._draw(0)

    def _draw(self, rnd: int) -> np.ndarray:
        s = self.settings
        return round_graph(
            s.topology,
            s.num_peers,
            seed=s.seed,
            rnd=rnd,
            edge_probability=s.edge_probability,
            time_varying=s.time_varying,
        )

    def graph(self, rnd: int) -> np.ndarray:
        """Round ``rnd``'s adjacency (pure in the seed; also called by service threads)."""
        return self._fixed if self._fixed is not None else self._draw(rnd)

    def neighbours_of(self, rnd: int) -> set[int]:
        return {int(j) for j in np.flatnonzero(self.graph(rnd)[self.settings.peer_id])}

    def wait_for_start(self) -> set[int]:
        """Wait (up to ``start_timeout_s``) until round 1's neighbours listen; those who
        do not are pushed to anyway every round, and mixed with once they answer."""
        deadline = time.monotonic() + self.settings.start_timeout_s
        ready: set[int] = set()
        for j in sorted(self.neighbours_of(1)):
            left = max(0.1, deadline - time.monotonic())
            status = self.neighbours.ping(j, timeout=left, wait_for_ready=True)
            if status == ACCEPTED:
                ready.add(j)
            else:
                log.warning(
                    "peer %d: neighbour %d did not answer at start (%s)",
                    self.settings.peer_id,
                    j,
                    status,
                )
        return ready

    def _still_expected(self, waiting: set[int]) -> set[int]:
        alive = set()
        for j in waiting:
            status = self.neighbours.ping(j, timeout=self.settings.push_timeout_s)
            if status in (ACCEPTED, TIMEOUT):
                alive.add(j)
        return alive

    def run_round(self, rnd: int) -> dict[str, Any]:
        s = self.settings
        started = time.perf_counter()
        half, train_metrics = self.train(rnd, self.model)
        nbrs = self.neighbours_of(rnd)
        payload = encode_model(sender=s.peer_id, rnd=rnd, vector=half)
        statuses = self.neighbours.push_all(sorted(nbrs), payload, timeout=s.push_timeout_s)
        # Wait only for those that took the push (or may have: a timeout); a refused
        # connection is a dead peer, "late"/"early" one that is out of step with us.
        expected = {j for j, st in statuses.items() if st in (ACCEPTED, DUPLICATE, TIMEOUT)}
        got = self.inbox.wait(
            rnd,
            expected,
            accept=nbrs,
            deadline=time.monotonic() + s.round_timeout_s,
            still_expected=self._still_expected,
            poll_s=s.probe_every_s,
        )
        bytes_down = self.inbox.bytes_received.get(rnd, 0)
        self.inbox.finish(rnd)
        row = renormalised_row(metropolis_hastings(self.graph(rnd)), s.peer_id, set(got))
        mixed = row[s.peer_id] * half.astype(np.float64)
        for j, model in got.items():
            mixed += row[j] * model.astype(np.float64)
        self.model = mixed.astype(np.float32)
        seen = np.stack([half, *(got[j] for j in sorted(got))])
        record: dict[str, Any] = {
            "round": rnd,
            **{k: float(v) for k, v in self.evaluate(self.model).items()},
            "train_loss": train_metrics.get("train_loss"),
            # Over this peer's half-step model and the neighbours' it mixed with.
            "consensus_distance": consensus_distance(seen),
            "neighbours": len(nbrs),
            "neighbours_heard": len(got),
            "neighbours_missing": sorted(nbrs - set(got)),
            "unreachable": sorted(j for j, st in statuses.items() if st == UNREACHABLE),
            "own_weight": float(row[s.peer_id]),
            "bytes_up": len(payload) * sum(st == ACCEPTED for st in statuses.values()),
            "bytes_down": int(bytes_down),
            "rejected_messages": sum(self.ledger.snapshot().values()),
            "round_s": time.perf_counter() - started,
        }
        self.store.record_round(record)
        self.store.save_checkpoint(Checkpoint(rnd, {"global": self.model}), keep_last=2)
        if self.on_round is not None:
            self.on_round(record)
        return record

    def run(self) -> list[dict[str, Any]]:
        self.wait_for_start()
        return [self.run_round(rnd) for rnd in range(1, self.settings.rounds + 1)]
