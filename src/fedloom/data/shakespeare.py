"""Next-character prediction on Shakespeare, one client per speaking role.

This follows LEAF's Shakespeare task (Caldas et al. 2018, "LEAF: A Benchmark for
Federated Settings", Section 3; first used federatedly by McMahan et al. 2017,
Section 3): every role in the plays is a client, so clients differ in vocabulary,
style and amount of text — a naturally non-IID set. Here the source is Karpathy's
Tiny Shakespeare (one text file of plays) rather than LEAF's Gutenberg edition.

Parsing: a *speaker line* is a line holding only a name followed by a colon
("FIRST CITIZEN:", "Senators, &C:"), at the start of the file or after a blank line;
the speech is the lines that follow up to the next blank line. A role's text is its
speeches' lines, each ending in a newline, in order of appearance. Roles that share a
name (the same name in different plays, e.g. "Servant") are merged into one client.

Samples are windows of ``data.seq_len`` consecutive character ids ``x`` and the next
character ``y``, at stride 1. The first ``1 - data.test_fraction`` of a role's windows
(in time order) are its training data, the rest its local test set; the server's test
set is all kept clients' test sets. Ids index ``FederatedDataset.vocab``, the sorted
characters present in the roles' text; ``x`` is uint8 (the model casts to long).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from fedloom.config import ConfigError, DataConfig
from fedloom.data.base import ArrayDataset, ClientData, FederatedDataset, data_path

SPEAKER = re.compile(r"[A-Za-z][A-Za-z ,&'.-]{0,48}:")
MAX_VOCAB = 256  # ids are stored as uint8


def parse_roles(text: str) -> dict[str, str]:
    """Each role's concatenated speech text, keyed by role name, in order of first appearance."""
    lines: dict[str, list[str]] = {}
    speaker: str | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line:
            speaker = None
        elif speaker is None:
            if SPEAKER.fullmatch(line):
                speaker = line[:-1].strip()
                lines.setdefault(speaker, [])
        else:
            lines[speaker].append(line + "\n")
    return {name: "".join(parts) for name, parts in lines.items() if parts}


def encode(text: str, vocab: str) -> np.ndarray:
    """Character ids (uint8) of ``text`` under the sorted vocabulary ``vocab``."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.frombuffer(vocab.encode("utf-32-le"), dtype=np.uint32)
    return np.searchsorted(table, codes).astype(np.uint8)


@dataclass(frozen=True)
class _Role:
    name: str
    ids: np.ndarray
    n_train: int


def _windows(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """All stride-1 windows: ``x[i] = ids[i:i+seq_len]``, ``y[i] = ids[i+seq_len]``."""
    view = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)
    return np.ascontiguousarray(view[:, :seq_len]), view[:, seq_len].astype(np.int64)


def _client(client_id: int, role: _Role, seq_len: int) -> ClientData:
    x, y = _windows(role.ids, seq_len)
    n = role.n_train
    return ClientData(
        client_id=client_id,
        name=role.name,
        train=ArrayDataset(x[:n], y[:n]),
        test=ArrayDataset(x[n:], y[n:]),
    )


def _read_text(cfg: DataConfig) -> str:
    path = data_path(
        cfg, directory=False, hint="point it at a plain-text play file (e.g. tinyshakespeare.txt)"
    )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"data.path '{cfg.path}' is not UTF-8 text") from None


def _select(roles: list[_Role], cfg: DataConfig, notes: list[str]) -> list[_Role]:
    """Drop roles below ``min_client_samples``; keep the largest ``max_clients``."""
    kept = [r for r in roles if r.n_train >= cfg.min_client_samples]
    if len(kept) < len(roles):
        notes.append(
            f"shakespeare: dropped {len(roles) - len(kept)} roles with fewer than "
            f"{cfg.min_client_samples} training windows (data.min_client_samples)"
        )
    if cfg.max_clients is not None and len(kept) > cfg.max_clients:
        order = sorted(range(len(kept)), key=lambda i: (-kept[i].n_train, i))
        chosen = set(order[: cfg.max_clients])
        notes.append(
            f"shakespeare: kept the {cfg.max_clients} largest of {len(kept)} roles "
            "(data.max_clients)"
        )
        kept = [r for i, r in enumerate(kept) if i in chosen]
    return kept


def build_shakespeare(cfg: DataConfig, rng: np.random.Generator) -> FederatedDataset:
    """One client per role; deterministic (``rng`` is unused: the split is in time order)."""
    del rng
    texts = parse_roles(_read_text(cfg))
    if not texts:
        raise ConfigError(
            f"data.path '{cfg.path}' has no 'NAME:' speaker lines; it must be a play text "
            "like tinyshakespeare.txt"
        )
    vocab = "".join(sorted(set("".join(texts.values()))))
    if len(vocab) > MAX_VOCAB:
        raise ConfigError(
            f"data.path '{cfg.path}' uses {len(vocab)} distinct characters; at most "
            f"{MAX_VOCAB} fit the uint8 character ids"
        )
    roles = []
    for name, text in texts.items():
        n_windows = max(len(text) - cfg.seq_len, 0)
        n_train = int(n_windows * (1.0 - cfg.test_fraction))
        roles.append(_Role(name, encode(text, vocab), n_train))
    notes = [
        f"shakespeare: {len(roles)} roles parsed; roles with the same name in different "
        "plays are merged into one client"
    ]
    kept = _select(roles, cfg, notes)
    if not kept:
        raise ConfigError(
            f"no role in '{cfg.path}' has {cfg.min_client_samples} training windows of "
            f"data.seq_len={cfg.seq_len}; lower data.seq_len or data.min_client_samples"
        )
    notes.append(
        f"shakespeare: {len(kept)} clients, one per role; data.num_clients is not used "
        "(data.max_clients caps the count)"
    )
    clients = [_client(i, role, cfg.seq_len) for i, role in enumerate(kept)]
    return FederatedDataset(
        name="shakespeare",
        kind="sequence",
        clients=clients,
        test=ArrayDataset.concat([c.test for c in clients if c.test is not None]),
        num_classes=len(vocab),
        input_shape=(cfg.seq_len,),
        vocab=vocab,
        notes=notes,
    )
