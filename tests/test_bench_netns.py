"""The emulated two-machine network of the benchmarks: shaped, and always removed.

Needs root and iproute2 (CI runs as root): without them these tests fail saying so.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from codistill.bench.netns import NAMESPACES, TwoMachines

HOLD = """
import time
from codistill.bench.netns import TwoMachines
with TwoMachines(100) as link:
    print("up", flush=True)
    time.sleep(120)
"""


@pytest.fixture(autouse=True)
def _needs_root_and_iproute2():
    if os.geteuid() != 0:
        pytest.fail("the network-namespace benchmarks need root (CI runs as root)")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install the Debian package iproute2")


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()} & set(NAMESPACES)


def start_holder() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up", proc.stderr.read()
    assert namespaces() == set(NAMESPACES)
    return proc


def test_link_is_shaped_and_namespaces_removed_on_exit():
    with TwoMachines(100) as link:
        assert namespaces() == set(NAMESPACES)
        assert "rate 100Mbit" in link.qdisc(0) and "tbf" in link.qdisc(0)
        mbit = link.measure_throughput(nbytes=2_000_000)
        assert 50 < mbit < 130, mbit  # tbf really limits the link
        before = link.link_bytes()["tx"]
        link.measure_throughput(nbytes=500_000)
        assert link.link_bytes()["tx"] - before >= 500_000  # the counters see the traffic
    assert namespaces() == set()


def test_namespaces_removed_on_sigterm():
    proc = start_holder()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert namespaces() == set()


def test_namespaces_left_by_a_killed_run_are_removed_by_the_next():
    proc = start_holder()
    proc.kill()  # SIGKILL: no cleanup can run
    proc.wait(timeout=30)
    assert namespaces() == set(NAMESPACES)
    with TwoMachines(None):
        assert namespaces() == set(NAMESPACES)
    assert namespaces() == set()
