"""MkDocs hook: render the reStructuredText roles of fedloom's docstrings as code.

The docstrings cross-reference with Sphinx roles (``:func:`simulate```,
``:class:`~fedloom.store.RunStore```), which Markdown renders as the role's name in front
of a code span. This hook drops the role and the ``~`` (which in Sphinx means "show the
last name only"), so the page shows ``simulate`` / ``RunStore`` as code.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(
    r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):<code>(~?)([\w.]+)</code>"
)


def _short(match: re.Match[str]) -> str:
    tilde, name = match.groups()
    return f"<code>{name.rsplit('.', 1)[-1] if tilde else name}</code>"


def on_page_content(html: str, **_: Any) -> str:
    """Drop ``:role:`` before inline code in a rendered page."""
    return _ROLE.sub(_short, html)
