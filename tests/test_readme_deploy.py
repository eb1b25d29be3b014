"""The README's "Deploy across machines" walkthrough, run exactly as written (on a free port)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from .deploy_helpers import free_port  # noqa: E402


def _walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- deploy-walkthrough:begin -->\s*```bash\n(.*?)```\s*<!-- deploy-walkthrough:end -->",
        text,
        re.S,
    )
    assert block, "README lost its deploy walkthrough"
    return block.group(1)


def test_readme_deploy_walkthrough_runs(tmp_path: Path) -> None:
    script = _walkthrough().replace("8443", str(free_port()))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "runs" / "deployed" / "summary.json").read_text())
    assert summary["rounds_completed"] == 5
    assert all(r["clients_succeeded"] == 3 for r in summary["history"])
    assert done.stdout.count("run over; this client completed 5 tasks") == 3
