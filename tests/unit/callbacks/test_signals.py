"""stop_on_sigterm (siamese.callbacks.signals): SIGTERM unwinds a job's writes; a second
SIGTERM long after the first (the unwinding hangs) ends the process at once, one right
after it (the same stop delivered twice) does not."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT

# Two processes that import Lightning (~8 s each); default suite under 5 minutes.
pytestmark = pytest.mark.slow

# The unwinding of the first SIGTERM hangs (a finally that never returns).
HANGING_UNWIND = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from siamese.callbacks import signals
signals.INSIST_AFTER_S = 0.5
with signals.stop_on_sigterm(Path("."), "writing", "job.py"):
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:
        time.sleep(60)
"""


_READY: list[subprocess.Popen] = []


@pytest.fixture(scope="module", autouse=True)
def _one_process_per_test_started_together():
    """Each test's process starts at once with the others: their imports (~8 s of Lightning
    each) overlap on two cores. Any a test did not take is killed at the end."""
    _READY.extend(
        subprocess.Popen(
            [sys.executable, "-c", HANGING_UNWIND], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    )
    yield
    while _READY:
        proc = _READY.pop()
        proc.kill()
        proc.wait()


def _started() -> subprocess.Popen:
    proc = _READY.pop(0)
    assert proc.stdout.readline().strip() == b"ready"
    return proc


def test_a_second_sigterm_soon_after_the_first_does_not_cut_it_short():
    proc = _started()
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the same stop, forwarded twice
        time.sleep(0.3)
        assert proc.poll() is None  # still unwinding the first
    finally:
        proc.kill()
        proc.wait()


def test_a_second_sigterm_later_ends_a_hanging_unwind_at_once():
    proc = _started()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.8)  # past INSIST_AFTER_S: the first one's unwinding hangs
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
