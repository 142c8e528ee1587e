"""Two emulated machines on one host: network namespaces joined by a shaped veth link.

    netns cdbench0                                    netns cdbench1
    lo (up, unshaped)                                 lo (up, unshaped)
    cdbv0 10.77.0.1/24  <== veth, tbf RATE each way ==>  cdbv1 10.77.0.2/24

The veth pair is created directly inside the namespaces, so nothing ever appears in the host's
namespace, and every address a benchmark targets (10.77.0.1, 10.77.0.2) exists only in there.
Traffic between two processes of one namespace goes over its loopback (fast); only traffic
between the namespaces crosses the shaped link. `tc ... tbf` shapes egress, so each end is shaped,
and both directions run at RATE.

`TwoMachines` removes its namespaces however the benchmark ends: on leaving the `with` block
(exceptions and Ctrl-C included), on SIGTERM/SIGHUP (turned into SystemExit), at interpreter exit
(atexit), and, after a SIGKILL, at the start of the next run, which deletes namespaces of these
names left behind. A file lock serializes concurrent benchmark runs on one host, so the stale
cleanup never touches a live run's namespaces.

Needs root and iproute2 (`ip`, `tc`): Debian package `iproute2`.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import UserError

NAMESPACES = ("cdbench0", "cdbench1")
DEVICES = ("cdbv0", "cdbv1")
ADDRESSES = ("10.77.0.1", "10.77.0.2")
PREFIX = 24
LOCK_FILE = Path("/tmp/codistill-bench-netns.lock")
PERF_PORT = 5201


def check_netns_support() -> None:
    """Raise a one-line UserError saying what is missing for the namespace benchmarks."""
    if os.geteuid() != 0:
        raise UserError("this benchmark creates network namespaces and shapes a link with tc: it must run as "
                        "root (CI runs as root)")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} not found: install the Debian package iproute2 "
                        "(apt-get install -y iproute2)")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _existing_namespaces() -> set[str]:
    out = _ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL the processes still inside one of *our* namespaces, by pid (a crashed run's workers)."""
    for pid in _ip("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


def remove_namespaces() -> None:
    """Delete our namespaces (and with them the veth pair) if they exist; idempotent."""
    present = _existing_namespaces()
    for ns in NAMESPACES:
        if ns in present:
            _kill_namespace_processes(ns)
            _ip("netns", "del", ns, check=False)
    left = _existing_namespaces() & set(NAMESPACES)
    if left:
        raise RuntimeError(f"could not delete network namespaces {sorted(left)}; delete them with "
                           f"`ip netns del NAME` as root")


def tbf_args(rate_mbit: float) -> list[str]:
    """tbf at `rate_mbit`; the bucket holds 10 ms of traffic (at least 64 KB, above any HZ's need)."""
    burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 / 100))
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "100ms"]


class TwoMachines:
    """`with TwoMachines(rate_mbit=100) as link:` two namespaces joined by a shaped link."""

    def __init__(self, rate_mbit: float | None = None, lock_timeout_s: float = 900.0):
        self.rate_mbit = rate_mbit
        self.lock_timeout_s = lock_timeout_s
        self._lock = None
        self._previous_handlers: dict = {}
        self._up = False

    # -- lifetime -------------------------------------------------------------------------------

    def __enter__(self) -> "TwoMachines":
        check_netns_support()
        self._acquire_lock()
        try:
            atexit.register(self.close)
            self._install_signal_handlers()
            remove_namespaces()  # a previous run killed with SIGKILL leaves them behind
            self._create()
            self.shape(self.rate_mbit)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the namespaces, restore signal handlers, release the lock (safe to call twice)."""
        try:
            if self._up or self._lock is not None:
                remove_namespaces()
            self._up = False
        finally:
            self._restore_signal_handlers()
            if self._lock is not None:
                self._lock.close()  # releases the flock
                self._lock = None
            atexit.unregister(self.close)

    def _acquire_lock(self) -> None:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(LOCK_FILE, "a")
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock.close()
                    self._lock = None
                    raise UserError(f"another benchmark holds {LOCK_FILE} (its namespaces are in use) "
                                    f"for more than {self.lock_timeout_s:.0f} s") from None
                time.sleep(1.0)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            raise SystemExit(128 + signum)  # unwinds through every `finally`, then atexit

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._previous_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous)
        self._previous_handlers = {}

    def _create(self) -> None:
        for ns in NAMESPACES:
            _ip("netns", "add", ns)
        self._up = True
        ns0, ns1 = NAMESPACES
        dev0, dev1 = DEVICES
        # Created inside ns0 with its peer placed directly in ns1: never visible in the host namespace.
        _ip("-n", ns0, "link", "add", dev0, "type", "veth", "peer", "name", dev1, "netns", ns1)
        for ns, dev, addr in zip(NAMESPACES, DEVICES, ADDRESSES):
            _ip("-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")

    # -- the link -------------------------------------------------------------------------------

    def shape(self, rate_mbit: float | None) -> None:
        """Shape both ends to `rate_mbit` (tbf), or remove the shaping (None)."""
        for ns, dev in zip(NAMESPACES, DEVICES):
            if rate_mbit is None:
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                               capture_output=True, timeout=30)
            else:
                proc = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                                       *tbf_args(rate_mbit)], capture_output=True, text=True, timeout=30)
                if proc.returncode != 0:
                    raise RuntimeError(f"tc failed to shape {dev} in {ns}: {proc.stderr.strip()}")
        self.rate_mbit = rate_mbit

    def qdisc(self, k: int = 0) -> str:
        return subprocess.run(["ip", "netns", "exec", NAMESPACES[k], "tc", "qdisc", "show", "dev", DEVICES[k]],
                              capture_output=True, text=True, timeout=30).stdout.strip()

    def link_bytes(self) -> dict:
        """Bytes the link carried so far, per direction (the veth counters in namespace 0)."""
        out = _ip("-n", NAMESPACES[0], "-j", "-s", "link", "show", "dev", DEVICES[0]).stdout
        stats = json.loads(out)[0]["stats64"]
        return {"tx": stats["tx"]["bytes"], "rx": stats["rx"]["bytes"]}

    def exec_argv(self, k: int, argv: list[str]) -> list[str]:
        """`argv` run inside machine k."""
        return ["ip", "netns", "exec", NAMESPACES[k], *argv]

    def measure_throughput(self, nbytes: int = 8_000_000, timeout: float = 60.0) -> float:
        """Mbit/s of one TCP stream from machine 0 to machine 1 (a calibration of the shaping)."""
        server = (
            "import socket,sys\n"
            f"s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('{ADDRESSES[1]}', {PERF_PORT})); s.listen(1); print('ready', flush=True)\n"
            "c,_=s.accept(); n=0\n"
            f"while n < {nbytes}:\n"
            "    b=c.recv(1<<20)\n"
            "    if not b: break\n"
            "    n+=len(b)\n"
            "c.sendall(b'k'); c.close()\n")
        client = (
            "import socket,time\n"
            "for _ in range(200):\n"
            "    try:\n"
            f"        c=socket.create_connection(('{ADDRESSES[1]}', {PERF_PORT})); break\n"
            "    except OSError: time.sleep(0.05)\n"
            f"buf=bytes(1<<20); n={nbytes}; t=time.perf_counter()\n"
            "while n>0:\n"
            "    c.sendall(buf[:min(n, len(buf))]); n-=min(n, len(buf))\n"
            "c.recv(1); print(time.perf_counter()-t)\n")
        srv = subprocess.Popen(self.exec_argv(1, [sys.executable, "-c", server]), stdout=subprocess.PIPE, text=True)
        try:
            srv.stdout.readline()  # "ready"
            out = subprocess.run(self.exec_argv(0, [sys.executable, "-c", client]), capture_output=True, text=True,
                                 timeout=timeout)
            if out.returncode != 0:
                raise RuntimeError(f"link throughput probe failed: {out.stderr.strip()[-500:]}")
            seconds = float(out.stdout.strip())
        finally:
            if srv.poll() is None:
                srv.kill()
            srv.wait()
        return nbytes * 8 / seconds / 1e6


MASTER_PORT = 29577  # inside namespace 0, which holds nothing else


def torchrun_train(link: TwoMachines, cli_args: list[str], log_dir: Path, timeout_s: float,
                   nproc_per_node: int = 2, preexec: dict | None = None) -> float:
    """`codistill train CLI_ARGS` on both machines under torchrun (static rendezvous on the link).

    Node k runs global ranks k * nproc_per_node ... (k + 1) * nproc_per_node - 1, so with
    rank = model * replicas + replica and replicas = nproc_per_node, machine k holds model k's group.
    gloo binds to the link's address (GLOO_SOCKET_IFNAME); pairs on one machine still talk over
    that machine's loopback. Returns the wall seconds of the whole launch; raises on failure, after
    killing what is left of both launches (by process group id). `preexec[k]`, if given, runs in
    machine k's launcher before it starts (e.g. joining a CPU-limited cgroup, inherited by its workers).
    """
    argvs = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(k),
              "--nproc-per-node", str(nproc_per_node), "--master-addr", ADDRESSES[0],
              "--master-port", str(MASTER_PORT), "--max-restarts", "0",
              "-m", "codistill.cli", "train", *cli_args] for k in (0, 1)]
    return run_on_machines(link, argvs, log_dir, timeout_s, preexec)


def run_on_machines(link: TwoMachines, argvs: list[list[str]], log_dir: Path, timeout_s: float,
                    preexec: dict | None = None) -> float:
    """Run argvs[k] inside machine k, both at once; wall seconds until both succeeded, else raise."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    start = time.perf_counter()
    try:
        for k, argv in enumerate(argvs):
            env = {**os.environ, "GLOO_SOCKET_IFNAME": DEVICES[k], "OMP_NUM_THREADS": "1",
                   "PYTHONUNBUFFERED": "1"}
            log = open(log_dir / f"node{k}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(link.exec_argv(k, argv), stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True, preexec_fn=(preexec or {}).get(k)))
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"launch did not finish within {timeout_s:.0f} s; logs in {log_dir}")
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one node failed: do not wait for the other to time out
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
        if codes != [0] * len(procs):
            failed = next((k for k, c in enumerate(codes) if c not in (None, 0)), 0)
            tail = (log_dir / f"node{failed}.log").read_text()[-3000:]
            raise RuntimeError(f"launch failed (exit codes {codes}); logs in {log_dir}:\n{tail}")
        return time.perf_counter() - start
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the group of the launch we started
                except ProcessLookupError:
                    pass
                p.wait()
        for log in logs:
            log.close()
