"""A stage dies with its `dvc` (issue 23, item 6): SIGTERM or SIGKILL to the `dvc repro` process alone (what
`kill <pid>`, `timeout` or a CI cancel do) stops the stage before it replaces any output, so the previous outputs
stay, matching the dvc.lock that was not updated.

A real `dvc repro` of a one-stage project whose stage is a real one in shape: `run_stage` around `stage_outputs`,
writing a new output, then waiting (bounded) for the test's go-ahead before its final rename.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dvc_project import ENV, sh

ROOT = Path(__file__).resolve().parents[1]

STAGE = '''
import os, time
from pathlib import Path
from stages.lib.io.files import run_stage, stage_outputs

def main():
    with stage_outputs() as outputs:
        out = outputs.path("out")
        out.mkdir()
        (out / "value.txt").write_text("new\\n")
        Path("started").write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not Path("release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

run_stage(main, None)
'''

DVC_YAML = f'''stages:
  slow:
    cmd: {sys.executable} slow_stage.py
    deps:
      - slow_stage.py
    outs:
      - out:
          persist: true
'''


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: a container's init may never reap an orphan)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def wait_for(condition, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("signal_to_dvc", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killing_dvc_stops_the_stage_before_it_replaces_outputs(tmp_path, signal_to_dvc):
    (tmp_path / "slow_stage.py").write_text(STAGE)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "value.txt").write_text("old\n")  # the previous output
    env = {**ENV, "PYTHONPATH": str(ROOT)}
    sh("git", "init", "-q", cwd=tmp_path)
    sh("dvc", "init", "-q", cwd=tmp_path)
    dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-q"], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (tmp_path / "started").exists() and (tmp_path / "started").read_text(), "the stage")
        stage_pid = int((tmp_path / "started").read_text())
        dvc.send_signal(signal_to_dvc)
        dvc.wait(timeout=60)
        (tmp_path / "release").touch()  # a stage still running would now replace out/
        wait_for(lambda: gone(stage_pid), "the stage to exit", seconds=30)
    finally:
        if dvc.poll() is None:
            dvc.kill()
            dvc.wait()
    time.sleep(0.5)  # past the point where an orphaned stage's rename would have landed
    assert (tmp_path / "out" / "value.txt").read_text() == "old\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["value.txt"]
    assert not os.path.exists(tmp_path / "dvc.lock")
