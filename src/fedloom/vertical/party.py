"""Vertical FL between real party processes: the same run as ``mode = "vertical"``.

The label party (``fedloom party --role label CONFIG``) serves a
:class:`~fedloom.vertical.transport.PartyHub`; feature party K (``fedloom party --role
features --party K``) dials it and answers its commands (:class:`FeatureWorker`). Over
each party's stream, in order:

1. ``welcome`` (the run's config and the party's slot) → ``joined`` (its id count).
2. PSI, the protocol of :mod:`fedloom.vertical.psi` with the label party leading, on
   what is left of its set, party after party: ``psi_blind`` (H(x)^a of the leader's
   ids, in chunks) → ``psi_blinded`` ((H(x)^a)^b); ``psi_own`` → ``psi_own`` (H(y)^b of
   the party's ids, in chunks). Only blinded group elements travel; then ``align`` (the
   party's own row positions of the common ids and which aligned rows train) →
   ``aligned``.
3. Per step of the batch schedule: ``forward`` (the step's row indices, and the
   gradients of the previous step's activations, which the party applies first) →
   ``activations``; after each round ``embed`` (the test rows) → ``activations``.
4. ``finish`` (the last gradients) → ``bye``: the party saves its bottom model.

Each party builds its own model from the run's seed, the label party draws the same
batch schedule and the same train/test split as the simulation, and the tensors cross
as exact float32, so the trained model equals the simulation's
(``tests/test_vertical_deploy.py``). Every received message is checked
(``fedloom.vertical.wire``: size, dtype, shape, index range, finite) against what the
step expects; a refused message ends the run with the sender named, because vertical
FL cannot train without a party's columns.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedloom.config import ConfigError, RunConfig, config_from_dict
from fedloom.store import RunStore
from fedloom.vertical.data import PartyTable, build_vertical_dataset, train_test_rows
from fedloom.vertical.psi import ELEMENT_BYTES, PsiParty
from fedloom.vertical.runner import (
    MODEL_FILE,
    check_vertical,
    make_feature_party,
    make_label_party,
    make_schedule,
    save_model,
    standardize,
    train_rounds,
)
from fedloom.vertical.split import FeatureParty, SplitTrainer
from fedloom.vertical.transport import PartyDroppedError, PartyHub, PartyLink
from fedloom.vertical.wire import Message, RejectedMessageError, encode, require, require_indices

log = logging.getLogger("fedloom.vertical")

#: Group elements per PSI message (4 MiB of 256-byte elements).
PSI_CHUNK = 16384


# ── the parties' own tables ────────────────────────────────────────────────────────


def read_table(path: Path, *, label: bool) -> PartyTable:
    """A party's CSV: an ``id`` column, then ``label`` (label party) or its feature columns.

    Raises :class:`ConfigError` with the line to fix.
    """
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except OSError as err:
        raise ConfigError(f"cannot read --data '{path}': {err.strerror}") from None
    if not rows or not rows[0] or rows[0][0] != "id":
        raise ConfigError(f"--data '{path}': the first row must be a header starting with 'id'")
    header, body = rows[0], rows[1:]
    if label and header != ["id", "label"]:
        raise ConfigError(f"--data '{path}': the label party's header must be 'id,label'")
    if not label and len(header) < 2:
        raise ConfigError(f"--data '{path}': a feature party's table needs feature columns")
    ids: list[str] = []
    values: list[list[float]] = []
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ConfigError(f"--data '{path}' line {line}: {len(row)} fields, not {len(header)}")
        ids.append(row[0])
        try:
            values.append([float(v) for v in row[1:]])
        except ValueError:
            raise ConfigError(f"--data '{path}' line {line}: a value is not a number") from None
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--data '{path}': an id appears twice; ids must identify records")
    table = np.asarray(values, dtype=np.float64).reshape(len(ids), len(header) - 1)
    if not np.isfinite(table).all():
        raise ConfigError(f"--data '{path}': a value is NaN or infinite")
    name = path.stem
    if label:
        y = table[:, 0]
        if (y != np.round(y)).any() or (y < 0).any():
            raise ConfigError(f"--data '{path}': labels must be class numbers 0, 1, 2, ...")
        return PartyTable(name=name, ids=ids, labels=y.astype(np.int64))
    return PartyTable(name=name, ids=ids, features=table.astype(np.float32), columns=header[1:])


def write_tables(cfg: RunConfig, out_dir: Path) -> list[Path]:
    """The config's built-in split as each party's own CSV (``label.csv``,
    ``features_K.csv``): what each party would hold on its own machine."""
    data = builtin_data(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    label = data.label_party
    assert label.labels is not None
    path = out_dir / "label.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows([i, int(y)] for i, y in zip(label.ids, label.labels, strict=True))
    written.append(path)
    for k, party in enumerate(data.feature_parties):
        assert party.features is not None and party.columns is not None
        path = out_dir / f"features_{k}.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", *party.columns])
            # 9 significant digits give every float32 back exactly.
            for i, row in zip(party.ids, party.features, strict=True):
                w.writerow([i, *(f"{float(v):.9g}" for v in row)])
        written.append(path)
    return written


def builtin_data(cfg: RunConfig) -> Any:
    v = cfg.vertical
    return build_vertical_dataset(
        v.dataset,
        parties=v.feature_parties,
        coverage=v.id_coverage,
        seed=cfg.seed,
        records=v.records,
    )


# ── the label party ────────────────────────────────────────────────────────────────


def _elements(values: Sequence[int]) -> np.ndarray:
    out = np.empty((len(values), ELEMENT_BYTES), dtype=np.uint8)
    for i, v in enumerate(values):
        out[i] = np.frombuffer(v.to_bytes(ELEMENT_BYTES, "big"), dtype=np.uint8)
    return out


def _integers(a: np.ndarray) -> list[int]:
    return [int.from_bytes(row.tobytes(), "big") for row in a]


class RemoteSplitTrainer(SplitTrainer):
    """:class:`SplitTrainer` with the feature parties in other processes.

    A step's message carries the previous step's gradients with the new rows, so each
    step costs one round trip per party, all parties at once; a party applies the
    gradients before the forward pass, the order the simulation uses.
    """

    def __init__(
        self, links: Sequence[PartyLink], *, embedding_dim: int, timeout: float, **kw: Any
    ) -> None:
        super().__init__(features=[], **kw)
        self.links, self.embedding_dim, self.timeout = list(links), embedding_dim, timeout
        self._pending: list[torch.Tensor] | None = None

    def _send_all(self, kind: str, rows: np.ndarray | None) -> None:
        pending, self._pending = self._pending, None
        for k, link in enumerate(self.links):
            arrays: dict[str, np.ndarray] = {}
            if rows is not None:
                arrays["rows"] = rows.astype(np.int32)
            if pending is not None:
                arrays["grad"] = pending[k].detach().to(torch.float32).contiguous().numpy()
            link.send(kind, arrays=arrays)

    def _exchange(self, kind: str, rows: np.ndarray) -> list[torch.Tensor]:
        self._send_all(kind, rows)
        out = []
        for link in self.links:
            msg = link.receive("activations", timeout=self.timeout)
            try:
                h = require(msg, "h", "float32", (len(rows), self.embedding_dim))
            except RejectedMessageError as err:
                link.rejections.add(err, f"feature party {link.party}")
                raise PartyDroppedError(link.party, link.identity, f"sent {err.detail}") from None
            out.append(torch.from_numpy(h.copy()))
        return out

    def forward(self, rows: np.ndarray) -> list[torch.Tensor]:
        return self._exchange("forward", rows)

    def backward(self, grads: Sequence[torch.Tensor]) -> None:
        self._pending = list(grads)

    def embed(self, rows: np.ndarray) -> list[torch.Tensor]:
        return self._exchange("embed", rows)

    def finish(self) -> None:
        """Deliver the last gradients; each party saves its bottom model."""
        self._send_all("finish", None)
        for link in self.links:
            link.receive("bye", timeout=self.timeout)


@dataclass(kw_only=True)
class LabelRun:
    """Where the label party's run stands (for the error when a party drops)."""

    round: int = 0
    stage: str = "waiting for the feature parties"


def _wire_bytes(links: Sequence[PartyLink]) -> tuple[int, int]:
    """(bytes the parties sent up, bytes the label party sent down) so far."""
    return sum(li.bytes_received for li in links), sum(li.bytes_sent for li in links)


def align_over_wire(
    table: PartyTable, links: Sequence[PartyLink], set_sizes: Sequence[int], *, timeout: float
) -> tuple[list[int], list[list[int]], dict[str, Any]]:
    """The label party's side of the PSI (:func:`fedloom.vertical.psi.align`, over the
    wire): its common rows, each feature party's positions, and the report (its caller
    adds the wire bytes, once the positions have been sent)."""
    started = time.perf_counter()
    leader = PsiParty(table.ids)
    remaining = list(range(len(table.ids)))
    payload = messages = 0
    follower_rows: list[dict[int, int]] = []
    for link, size in zip(links, set_sizes, strict=True):
        mine = leader.blind_own([table.ids[r] for r in remaining])
        double: list[int] = []
        for i in range(0, len(mine), PSI_CHUNK):
            chunk = mine[i : i + PSI_CHUNK]
            link.send("psi_blind", arrays={"elements": _elements(chunk)})
            msg = link.receive("psi_blinded", timeout=timeout)
            double += _integers(_checked(msg, link, (len(chunk), ELEMENT_BYTES)))
            messages += 2
        theirs: list[int] = []
        while len(theirs) < size:
            count = min(PSI_CHUNK, size - len(theirs))
            link.send("psi_own", {"start": len(theirs), "count": count})
            msg = link.receive("psi_own", timeout=timeout)
            theirs += _integers(_checked(msg, link, (count, ELEMENT_BYTES)))
            messages += 2
        try:
            where = {v: j for j, v in enumerate(leader.blind_theirs(theirs))}
        except ValueError as err:
            raise PartyDroppedError(
                link.party, link.identity, f"sent a bad PSI message ({err})"
            ) from None
        payload += ELEMENT_BYTES * (len(mine) + len(double) + len(theirs))
        pairs = [(i, where[v]) for i, v in enumerate(double) if v in where]
        follower_rows.append({remaining[i]: j for i, j in pairs})
        remaining = [remaining[i] for i, _ in pairs]
    positions = [remaining] + [[rows[r] for r in remaining] for rows in follower_rows]
    payload += 4 * len(remaining) * len(links)  # the positions "align" sends each party
    report = {
        "method": "dh-psi (RFC 3526 MODP-2048, 256-bit exponents) over gRPC",
        "intersection_size": len(remaining),
        "set_sizes": [len(table.ids), *set_sizes],
        # As the simulation counts it: group elements and row positions.
        "bytes_exchanged": payload,
        "messages": messages,
        "leader_exponentiations": leader.pows,
        "seconds": time.perf_counter() - started,
    }
    return remaining, positions, report


def _checked(msg: Message, link: PartyLink, shape: tuple[int, int]) -> np.ndarray:
    try:
        return require(msg, "elements", "uint8", shape)
    except RejectedMessageError as err:
        link.rejections.add(err, f"feature party {link.party}")
        raise PartyDroppedError(link.party, link.identity, f"sent {err.detail}") from None


def run_label_party(
    cfg: RunConfig,
    store: RunStore,
    hub: PartyHub,
    table: PartyTable,
    *,
    num_classes: int,
    wait_s: float,
    step_timeout_s: float,
    status: LabelRun,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> np.ndarray:
    """The label party's whole run; returns each party's participation (label first).

    Raises :class:`PartyDroppedError` when a feature party's stream ends or it stops
    answering; the other parties are told to stop, and completed rounds stay recorded.
    """
    check_vertical(cfg)
    v = cfg.vertical
    assert table.labels is not None
    torch.set_num_threads(cfg.engine.torch_threads)
    links = hub.wait_for_parties(wait_s)
    try:
        status.stage = "joining"
        joined = [li.receive("joined", timeout=step_timeout_s) for li in links]
        sizes = []
        for li, msg in zip(links, joined, strict=True):
            n = msg.fields.get("ids")
            if not isinstance(n, int) or n < 0:
                raise PartyDroppedError(
                    li.party, li.identity, "sent a 'joined' without its id count"
                )
            sizes.append(n)
        status.stage = "private set intersection"
        psi_started, (up0, down0) = time.perf_counter(), _wire_bytes(links)
        common, positions, alignment = align_over_wire(table, links, sizes, timeout=step_timeout_s)
        if len(common) < 4:
            raise ConfigError(
                f"the parties share only {len(common)} records; check the parties' ids"
            )
        y = table.labels[positions[0]]
        train_rows, test_rows = train_test_rows(
            len(y), test_fraction=v.test_fraction, seed=cfg.seed
        )
        status.stage = "alignment"
        for li, rows in zip(links, positions[1:], strict=True):
            li.send(
                "align",
                arrays={
                    "rows": np.asarray(rows, dtype=np.int32),
                    "train": train_rows.astype(np.int32),
                },
            )
        pows = 0
        for li in links:
            msg = li.receive("aligned", timeout=step_timeout_s)
            pows += int(msg.fields.get("pows", 0))
        alignment["exponentiations"] = alignment.pop("leader_exponentiations") + pows
        # The whole alignment, the row positions included: wire bytes, messages, time.
        up1, down1 = _wire_bytes(links)
        alignment["wire_bytes"] = (up1 - up0) + (down1 - down0)
        alignment["messages"] += 2 * len(links)
        alignment["seconds"] = time.perf_counter() - psi_started
        log.info(
            "PSI: %d common records of %s in %.1f s, %d bytes on the wire",
            alignment["intersection_size"],
            alignment["set_sizes"],
            alignment["seconds"],
            alignment["wire_bytes"],
        )
        store.set_meta("alignment", alignment)
        trainer = RemoteSplitTrainer(
            links,
            embedding_dim=v.embedding_dim,
            timeout=step_timeout_s,
            label=make_label_party(v, y, num_classes, seed=cfg.seed, top_parties=len(links)),
            train_rows=train_rows,
            test_rows=test_rows,
            schedule=make_schedule(v, len(train_rows), seed=cfg.seed),
            steps_per_round=v.steps_per_round,
        )
        last = list(_wire_bytes(links))

        def wire_fields() -> dict[str, Any]:
            up, down = _wire_bytes(links)
            fields = {
                "wire_bytes_up": up - last[0],
                "wire_bytes_down": down - last[1],
                "rejected_messages": hub.rejections.total,
            }
            last[:] = [up, down]
            return fields

        def started(rnd: int) -> None:
            status.round, status.stage = rnd, "training"

        train_rounds(
            trainer,
            store,
            rounds=cfg.rounds,
            parties=1 + len(links),
            on_round=on_round,
            extra=wire_fields,
            started_round=started,
        )
        status.stage = "finishing"
        trainer.finish()
    except PartyDroppedError as err:
        for li in links:
            if li.party != err.party and not li.closed.is_set():
                with contextlib.suppress(PartyDroppedError):  # closed meanwhile
                    li.send("abort", {"reason": f"the run stopped: {err}"})
        raise
    save_model(store.run_dir / MODEL_FILE, {"top": trainer.label.top})
    return np.full(1 + len(links), cfg.rounds, dtype=np.int64)


# ── a feature party ────────────────────────────────────────────────────────────────


class LabelPartyStoppedError(RuntimeError):
    """The label party ended the run (another party dropped, or it failed)."""


class FeatureWorker:
    """Feature party K's answers to the label party's commands, in order."""

    def __init__(
        self,
        party: int,
        table: PartyTable | None,
        out_dir: Path | None,
        *,
        on_event: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.party, self.table, self.out_dir, self.on_event = party, table, out_dir, on_event
        self.cfg: RunConfig | None = None
        self.psi: PsiParty | None = None
        self._own: list[int] | None = None
        self.bottom: FeatureParty | None = None
        self._sent: int | None = None  # rows of the activations awaiting gradients
        self.steps = 0
        self.rejected = 0
        #: Why this party stopped before the run's end (None: it has not).
        self.failure: str | None = None

    def answer(self, msg: Message) -> tuple[bytes, bool]:
        """The reply to ``msg`` and whether it is this party's last.

        A command this party refuses is answered with an ``error`` (the label party then
        stops the run naming this party and why) and ends this party's part:
        :attr:`failure` says why.
        """
        try:
            return self._answer(msg)
        except RejectedMessageError as err:
            self.rejected += 1
            self.failure = f"refused a message from the label party ({err.reason}: {err.detail})"
            log.warning("%s", self.failure)
            return encode("error", {"error": self.failure}), True

    def _answer(self, msg: Message) -> tuple[bytes, bool]:
        kind = msg.kind
        if kind == "welcome":
            return self._welcome(msg), False
        if kind == "abort":
            raise LabelPartyStoppedError(str(msg.fields.get("reason", "the label party stopped")))
        if self.cfg is None or self.psi is None or self.table is None:
            raise RejectedMessageError("protocol", f"a '{kind}' before the welcome")
        if kind == "psi_blind":
            values = _integers(require(msg, "elements", "uint8", (None, ELEMENT_BYTES)))
            try:
                blinded = self.psi.blind_theirs(values)
            except ValueError as err:
                raise RejectedMessageError("bad_value", str(err)) from None
            return encode("psi_blinded", arrays={"elements": _elements(blinded)}), False
        if kind == "psi_own":
            if self._own is None:
                self._own = self.psi.blind_own()
            start, count = msg.fields.get("start"), msg.fields.get("count")
            if not (
                isinstance(start, int)
                and isinstance(count, int)
                and start >= 0
                and 0 < count <= PSI_CHUNK
                and start + count <= len(self._own)
            ):
                raise RejectedMessageError("bad_index", f"psi_own range {start}+{count}")
            chunk = self._own[start : start + count]
            return encode("psi_own", arrays={"elements": _elements(chunk)}), False
        if kind == "align":
            return self._align(msg), False
        if self.bottom is None:
            raise RejectedMessageError("protocol", f"a '{kind}' before the alignment")
        n = len(self.bottom.x)
        self._apply_gradients(msg)
        if kind in ("forward", "embed"):
            rows = require_indices(msg, "rows", below=n)
            if kind == "forward":
                h = self.bottom.forward(rows)
                self._sent = len(rows)
            else:
                h = self.bottom.embed(rows)
            return encode("activations", arrays={"h": h.numpy().astype(np.float32)}), False
        if kind == "finish":
            if self.out_dir is not None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                save_model(self.out_dir / MODEL_FILE, {f"bottom{self.party}": self.bottom.bottom})
            self.on_event(f"run over; feature party {self.party} trained {self.steps} steps")
            return encode("bye"), True
        raise RejectedMessageError("protocol", f"an unknown command '{kind}'")

    def _welcome(self, msg: Message) -> bytes:
        raw = msg.fields.get("config")
        if not isinstance(raw, str):
            raise RejectedMessageError("protocol", "a welcome without the run's config")
        cfg = config_from_dict(json.loads(raw))
        check_vertical(cfg)
        if not 0 <= self.party < cfg.vertical.feature_parties:
            raise LabelPartyStoppedError(
                f"the run has {cfg.vertical.feature_parties} feature parties; "
                f"party {self.party} is not one of them"
            )
        if self.table is None:  # a trial: this party's share of the built-in data set
            self.table = builtin_data(cfg).feature_parties[self.party]
        torch.set_num_threads(cfg.engine.torch_threads)
        self.cfg = cfg
        assert self.table is not None
        self.psi = PsiParty(self.table.ids)
        self.on_event(
            f"feature party {self.party} joined the run '{cfg.name}' with {len(self.table.ids)} ids"
        )
        return encode("joined", {"ids": len(self.table.ids)})

    def _align(self, msg: Message) -> bytes:
        assert self.cfg is not None and self.table is not None and self.psi is not None
        assert self.table.features is not None
        rows = require_indices(msg, "rows", below=len(self.table.ids), unique=True)
        train = require_indices(msg, "train", below=len(rows), unique=True)
        if len(rows) < 2 or len(train) < 1:
            raise RejectedMessageError("bad_index", f"an alignment of {len(rows)} rows")
        x = standardize(self.table.features[rows], np.sort(train))
        self.bottom = make_feature_party(self.cfg.vertical, x, party=self.party, seed=self.cfg.seed)
        self.on_event(
            f"feature party {self.party}: {len(rows)} common records, {x.shape[1]} columns"
        )
        return encode("aligned", {"rows": len(rows), "pows": self.psi.pows})

    def _apply_gradients(self, msg: Message) -> None:
        assert self.bottom is not None and self.cfg is not None
        if "grad" not in msg.arrays:
            if self._sent is not None:
                raise RejectedMessageError("protocol", "a step without the last step's gradients")
            return
        if self._sent is None:
            raise RejectedMessageError(
                "protocol", "gradients for activations this party did not send"
            )
        g = require(msg, "grad", "float32", (self._sent, self.cfg.vertical.embedding_dim))
        self.bottom.backward(torch.from_numpy(g.copy()))
        self._sent = None
        self.steps += 1
