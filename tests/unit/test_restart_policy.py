"""The supervisor's restart policy and process-tree killing, on plain values and on a real small process tree."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from flywheel.stack import reaper
from flywheel.stack.restarts import HealthCount, RestartPolicy


def test_backoff_doubles_up_to_the_cap_then_gives_up_at_the_limit():
    policy = RestartPolicy(limit=4, window=600, backoff_max=5)
    delays = []
    for t in range(5):
        delays.append(policy.delay(float(t)))
        if delays[-1] is not None:
            policy.record(float(t))
    assert delays == [1, 2, 4, 5, None]


def test_restarts_outside_the_window_no_longer_count():
    policy = RestartPolicy(limit=2, window=10, backoff_max=30)
    policy.record(0)
    policy.record(1)
    assert policy.delay(5) is None
    assert policy.delay(10.5) == 2  # the first fell out of the window
    assert policy.delay(20) == 1


def test_health_count_needs_consecutive_failures():
    count = HealthCount(limit=3)
    assert not count.failed() and not count.failed()
    count.passed()
    assert not count.failed() and not count.failed() and count.failed()


def test_watch_reads_registrations_until_eof():
    lines = ["+ 100 55\n", "+ 200\n", "- 100\n", "garbage\n", "+ 300 7\n"]
    assert reaper.watch(iter(lines)) == {200: None, 300: 7}


def test_kill_groups_reaches_a_grandchild_that_left_the_group():
    """A group leader whose child called setsid: killing the group kills both (the tree is followed)."""
    code = (
        "import subprocess, sys, time;"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True);"
        "print(p.pid, flush=True); time.sleep(300)"
    )
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        grandchild = int(leader.stdout.readline())
        assert reaper.proc_info(grandchild).pgid == grandchild != leader.pid
        tree = reaper.tree_of_group(leader.pid)
        assert {leader.pid, grandchild} <= set(tree)
        left = reaper.kill_groups({leader.pid: reaper.start_time(leader.pid)}, grace=5)
        leader.wait(10)
        assert left == {}
        deadline = time.monotonic() + 10
        while reaper.running(grandchild, tree[grandchild]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not reaper.running(grandchild, tree[grandchild])
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait(5)


def test_a_reused_leader_pid_is_left_alone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        left = reaper.kill_groups({proc.pid: reaper.start_time(proc.pid) + 1}, grace=1)
        assert left == {}
        with pytest.raises(subprocess.TimeoutExpired):  # other start time: not the process registered, left alone
            proc.wait(2)
    finally:
        proc.kill()
        proc.wait(5)
