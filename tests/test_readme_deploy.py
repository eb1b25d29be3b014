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


def checking_jobs(script: str) -> str:
    """``script`` with its background jobs' exit statuses checked.

    A bare ``wait`` exits 0 whatever its jobs did, so a walkthrough whose server or
    client failed would pass. Each line that starts a job (ends in a single ``&``) also
    records the job's pid, and a closing bare ``wait`` waits for each pid in turn, which
    under ``set -e`` ends the script with the first failed job's status.
    """
    lines = script.rstrip("\n").split("\n")
    jobs = sum(1 for line in lines if re.search(r"(?<!&)&\s*$", line))
    if lines and lines[-1].strip() != "wait":
        # The walkthrough waits on each job itself: every job must be waited for.
        waited = len(re.findall(r'wait "\$\w+"', lines[-1]))
        if waited != jobs:
            raise AssertionError(
                f"the walkthrough starts {jobs} jobs but its last line waits for {waited}; "
                "update it or this test"
            )
        return script
    if not lines:
        raise AssertionError("the walkthrough is empty")
    out: list[str] = ["fedloom_jobs=()"]
    for line in lines[:-1]:
        out.append(line)
        if re.search(r"(?<!&)&\s*$", line):
            out.append('fedloom_jobs+=("$!")')
    out.append('for job in "${fedloom_jobs[@]}"; do wait "$job"; done')
    return "\n".join(out) + "\n"


def test_checking_jobs_fails_on_a_failed_job(tmp_path: Path) -> None:
    script = checking_jobs("(exit 0) &\n(sleep 0.2; exit 3) &\ntrue && true\nwait\n")
    assert script.count('fedloom_jobs+=("$!")') == 2
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=False, timeout=60)
    assert done.returncode == 3


def test_readme_deploy_walkthrough_runs(tmp_path: Path) -> None:
    script = checking_jobs(_walkthrough().replace("8443", str(free_port())))
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
