"""How the labels are spread across clients: counts, a text table, a skew number, a plot.

The skew measure is the mean, over clients, of the total-variation distance between a
client's label distribution and the global one (0 = every client looks like the whole;
1 = clients share no labels with the population mix). It is the quantity a Dirichlet
concentration α controls (Hsu et al. 2019, Section 3), so it is comparable across
partitioners and data sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedloom.data.base import FederatedDataset

#: Above this many classes the per-class columns give way to a compact summary.
MAX_CLASS_COLUMNS = 20


def label_histogram(dataset: FederatedDataset) -> np.ndarray:
    """``(num_clients, num_classes)`` int64 counts of each client's training labels."""
    rows = [
        np.bincount(np.asarray(c.train.y, dtype=np.int64), minlength=dataset.num_classes)
        for c in dataset.clients
    ]
    if not rows:
        return np.zeros((0, dataset.num_classes), dtype=np.int64)
    return np.stack(rows).astype(np.int64)


def _skew(hist: np.ndarray) -> float:
    """:func:`label_skew` of a :func:`label_histogram`; clients without data do not count."""
    sizes = hist.sum(axis=1)
    hist = hist[sizes > 0]
    sizes = sizes[sizes > 0]
    if len(sizes) == 0:
        return 0.0
    global_mix = hist.sum(axis=0) / sizes.sum()
    client_mix = hist / sizes[:, None]
    return float((0.5 * np.abs(client_mix - global_mix).sum(axis=1)).mean())


def label_skew(dataset: FederatedDataset) -> float:
    """Mean total-variation distance of client label distributions from the global one."""
    return _skew(label_histogram(dataset))


def _row_cells(name: str, counts: np.ndarray, wide: bool) -> list[str]:
    n = int(counts.sum())
    if not wide:
        return [name, str(n), *(str(int(c)) for c in counts)]
    top = int(np.argmax(counts)) if n else 0
    share = counts[top] / n if n else 0.0
    return [name, str(n), str(int((counts > 0).sum())), f"{top} ({share:.0%})"]


def format_label_histogram(dataset: FederatedDataset, max_rows: int = 30) -> str:
    """A fixed-width table: client, n, per-class counts (or a summary if classes are many)."""
    hist = label_histogram(dataset)
    wide = dataset.num_classes > MAX_CLASS_COLUMNS
    header = ["client", "n"]
    header += ["classes", "top class"] if wide else [str(c) for c in range(dataset.num_classes)]
    rows = [_row_cells(c.name, hist[i], wide) for i, c in enumerate(dataset.clients[:max_rows])]
    rows.append(_row_cells("all", hist.sum(axis=0), wide))
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def fmt(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    lines = [fmt(header), *(fmt(r) for r in rows[:-1])]
    if dataset.num_clients > max_rows:
        lines.append(f"... {dataset.num_clients - max_rows} more clients")
    lines.append(fmt(rows[-1]))
    lines.append(
        f"label skew (mean total-variation distance from the global label mix): {_skew(hist):.3f}"
    )
    return "\n".join(lines)


def plot_label_histogram(dataset: FederatedDataset, path: str | Path) -> Path:
    """Save a PNG: stacked label counts per client, or a client x class heatmap if many classes.

    The stacked bars are one :class:`~matplotlib.collections.PolyCollection` rather than
    one bar artist per client and class: matplotlib's cost is per artist, and with 500
    clients the separate bars took 2.2 s, the collection 0.1 s. The figure is
    drawn on an Agg canvas without ``pyplot``, so the caller's backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    hist = label_histogram(dataset)
    fig = Figure(figsize=(max(6.0, min(24.0, 0.25 * len(hist) + 2)), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if dataset.num_classes <= MAX_CLASS_COLUMNS:
        handles = _stacked_bars(ax, hist)
        ax.set_ylabel("training samples")
        ax.legend(
            handles=handles,
            title="label",
            fontsize="small",
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
        )
    else:
        sizes = np.maximum(hist.sum(axis=1, keepdims=True), 1)
        image = ax.imshow((hist / sizes).T, aspect="auto", origin="lower", cmap="viridis")
        fig.colorbar(image, ax=ax, label="share of client's samples")
        ax.set_ylabel("label")
    ax.set_xlabel("client")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{dataset.name}: labels per client (skew {_skew(hist):.2f})")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _stacked_bars(ax: Any, hist: np.ndarray, width: float = 0.9) -> list[Any]:
    """Client i's label counts as bars stacked at x = i: one artist for all of them.

    Returns legend handles (a collection has no per-label entries of its own).
    """
    from matplotlib import colormaps
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    num_classes = hist.shape[1]
    cmap = colormaps["tab20" if num_classes > 10 else "tab10"]
    tops = np.cumsum(hist, axis=1)
    client, label = np.nonzero(hist)  # empty segments draw nothing
    left, right = client - width / 2, client + width / 2
    bottom, top = tops[client, label] - hist[client, label], tops[client, label]
    corners = np.stack([left, bottom, right, bottom, right, top, left, top], axis=1)
    bars = PolyCollection(
        list(corners.reshape(-1, 4, 2).astype(float)), facecolors=cmap(label), linewidths=0
    )
    bars.sticky_edges.y.append(0)  # bars stand on the axis, as ax.bar's do
    ax.add_collection(bars)
    ax.autoscale_view()
    return [Patch(color=cmap(c), label=str(c)) for c in range(num_classes)]


def write_client_summary(dataset: FederatedDataset, out_dir: Path) -> None:
    """``clients.txt`` (and ``clients.png`` for class labels) in a run directory.

    Regression targets have no classes to count, so their table lists each client's size
    and no plot is drawn.
    """
    if dataset.on_demand:
        # Made when sampled: list sizes only, without making every client's data.
        rows = [f"{i}\t{n}" for i, n in enumerate(dataset.client_sizes().tolist())]
        (out_dir / "clients.txt").write_text("\n".join(["client\texamples", *rows]) + "\n")
        return
    if any(c.train.y.dtype.kind == "f" for c in dataset.clients):
        rows = [f"{c.client_id}\t{c.name}\t{len(c.train)}" for c in dataset.clients]
        (out_dir / "clients.txt").write_text("\n".join(["client\tname\texamples", *rows]) + "\n")
        return
    (out_dir / "clients.txt").write_text(format_label_histogram(dataset) + "\n")
    plot_label_histogram(dataset, out_dir / "clients.png")
