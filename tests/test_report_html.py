"""`fedloom report RUN_DIR --html` on a real run with a failing client: the file holds
the summary, every round, the failure (escaped), embedded plots, and nothing outside."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from fedloom.algorithms.base import AlgorithmSettings, ClientContext, ClientUpdate, StageContext
from fedloom.cli import main
from fedloom.config import load_config
from fedloom.engine.simulation import run_simulation
from fedloom.registry import CLIENT_ALGORITHMS
from fedloom.store import SUMMARY_FILE
from tests.browser import Browser, browser  # noqa: F401  (the fixture)

#: Markup in a client's error text must arrive as text, never as markup.
ERROR = "<b>boom</b> & <script>alert(1)</script>"
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "wbr", "source", "area", "base"}


class _FailsOnce:
    """``sgd``, except client 0 raises in round 2."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def fit(self, ctx: ClientContext) -> ClientUpdate:
        if ctx.client_id == 0 and ctx.round == 2:
            raise RuntimeError(ERROR)
        update: ClientUpdate = self.inner.fit(ctx)
        return update

    def evaluate(self, ctx: ClientContext) -> dict[str, float]:
        return dict(self.inner.evaluate(ctx))


if "report-test-fails-once" not in CLIENT_ALGORITHMS:

    @CLIENT_ALGORITHMS.register("report-test-fails-once")
    def _make(settings: AlgorithmSettings, context: StageContext) -> _FailsOnce:
        return _FailsOnce(CLIENT_ALGORITHMS.create("sgd", settings, context))


class _Page(HTMLParser):
    """Collects what the checks need and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.images: list[str] = []
        self.tags: list[str] = []
        self.cells: list[str] = []
        self.text: list[str] = []
        self.doctype = ""
        self._cell: list[str] | None = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "data", "poster") and value:
                self.links.append((tag, name, value))
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        if tag not in VOID:
            self.stack.append(tag)
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html") / "run"
    cfg = load_config(
        None,
        [
            "rounds=4",
            "client.epochs=1",
            "data.num_clients=5",
            "client.algorithm=report-test-fails-once",
        ],
    )
    run_simulation(cfg, out)
    return out


def test_html_report_is_self_contained_and_complete(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(run), "--html"]) == 0
    assert "report.html" in capsys.readouterr().out
    page = _parse(run / "report.html")
    summary = json.loads((run / SUMMARY_FILE).read_text())

    assert page.doctype.lower() == "doctype html" and page.tags[:2] == ["html", "head"]
    assert page.errors == [] and page.stack == []
    # Nothing outside the file: every src and href is a data: URI (the images, and an
    # empty icon so that a browser requests none), with no script at all.
    assert page.links and all(value.startswith("data:") for _, _, value in page.links)
    assert [(t, a) for t, a, _ in page.links if a == "href"] == [("link", "href")]
    assert all(v.startswith("data:image/png;base64,") for _, a, v in page.links if a == "src")
    assert "script" not in page.tags
    pngs = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
    assert len(pngs) == 2  # the accuracy plot and the run's clients.png
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 1000 for p in pngs)

    # The summary's numbers, formatted as the terminal shows them.
    cells = page.cells
    assert f"{summary['final']['accuracy']:.4f}" in cells
    assert str(summary["rounds_completed"]) in cells
    # Every round: the rounds table holds each round's number and its accuracy.
    for record in summary["history"]:
        assert f"{record['accuracy']:.4f}" in cells
    heads = [c for c in cells if c in ("round", "accuracy", "ok/sampled")]
    assert heads[:3] == ["round", "accuracy", "ok/sampled"]
    assert "4/5" in cells  # round 2: client 0 failed

    # The failure, with its traceback, as text (escaped), not markup.
    text = "".join(page.text)
    assert "round 2, client 0: RuntimeError: " + ERROR in text
    assert "Traceback" in text
    raw = (run / "report.html").read_text()
    assert "<script>" not in raw and "&lt;script&gt;" in raw
    # The config, as dotted keys.
    assert "client.algorithm" in cells and "report-test-fails-once" in cells


def test_html_report_opens_in_a_real_browser_without_errors(
    run: Path,
    browser: Browser,  # noqa: F811
) -> None:
    """Acceptance: the file a user attaches to a ticket renders in Chromium, its two plots
    decode as images there, and the console stays clean (no blocked or missing resource)."""
    assert main(["report", str(run), "--html", "--out", str(run / "browser.html")]) == 0
    browser.open((run / "browser.html").as_uri())
    loaded = browser.wait_for(
        lambda: browser.js(
            "const imgs = [...document.images];"
            "return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0)"
            " ? imgs.map(i => i.naturalWidth) : null;"
        ),
        timeout=120,
        what="both plots decoded",
    )
    assert all(width > 100 for width in loaded)
    assert "round 2, client 0" in browser.js("return document.body.innerText;")
    browser.screenshot("report.png")
    assert browser.console_errors() == []


def test_html_report_of_an_unfinished_run_and_out(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / SUMMARY_FILE).rename(tmp_path / "summary.json")  # as if still running
    try:
        out = tmp_path / "mail.html"
        assert main(["report", str(run), "--html", "--out", str(out)]) == 0
        page = _parse(out)
        assert page.errors == []
        assert "has no summary.json" in "".join(page.text)
        history = json.loads((tmp_path / "summary.json").read_text())["history"]
        assert f"{history[-1]['accuracy']:.4f}" in page.cells
    finally:
        (tmp_path / "summary.json").rename(run / SUMMARY_FILE)
    capsys.readouterr()


def test_html_report_user_errors(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path), "--html"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a fedloom run directory" in err
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 2
    assert "add --html" in capsys.readouterr().err
    assert main(["report", str(run), "--html", "--out", str(tmp_path / "no" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
