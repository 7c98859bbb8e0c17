"""The launch helpers' deadline: a job past it is killed with every process it started, even
one in a session of its own (as torchrun starts its workers), and the test fails."""

from __future__ import annotations

import sys
import time

import psutil
import pytest

from tests.trainer.launching import finish, start

SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_job_past_its_deadline_is_killed_with_its_own_session_children():
    proc = start([sys.executable, "-c", SPAWNER])
    child = int(proc.stdout.readline())
    with pytest.raises(pytest.fail.Exception, match="still running after 1 s, killed"):
        finish(proc, 1)
    assert proc.returncode is not None
    deadline = time.time() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the grandchild survived"
        time.sleep(0.05)
