"""A torchrun environment left in the shell fails in seconds with one line (issue 31, item 4).

RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and TORCHELASTIC_RUN_ID survive in a shell
(or in a script that torchrun started) after the launch has ended. Before, they passed the
launcher check and the command waited dist.timeout_s = 600 s for a store nobody serves. Real
torchrun launches are covered by test_torchrun_commands.py and test_reliability.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dead_port():
    """A port bound but not listening: connecting is refused, and nobody else can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def leftover(port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    return {**env, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "left-over", "OMP_NUM_THREADS": "1", **extra}


def run_cli(env: dict[str, str], out: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    # Defaults: dist.timeout_s = 600 s, the wait this must not come near.
    argv = [sys.executable, "-m", "codistill.cli", *args, "--config", str(ROOT / "configs/digits_tiny.yaml"),
            "--out", str(out)]
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=100, env=env)
    return proc, time.monotonic() - start


CASES = [
    # torchrun's full worker environment, copied from a launch whose agent (and store) are gone.
    ("agent store gone", {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"},
     ["rendezvous at MASTER_ADDR:MASTER_PORT=127.0.0.1:", "cannot be reached", "Connection refused",
      "unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT TORCHELASTIC_RUN_ID TORCHELASTIC_USE_AGENT_STORE"]),
    # The six variables of the issue: rank 0 would host a store and wait for a peer forever.
    ("six variables", {}, ["TORCHELASTIC_RUN_ID are set but not TORCHELASTIC_USE_AGENT_STORE",
                           "unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT TORCHELASTIC_RUN_ID"]),
]


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("name, extra, fragments", CASES, ids=[c[0] for c in CASES])
def test_leftover_torchrun_environment_fails_fast_with_one_line(tmp_path, dead_port, capsys, monkeypatch, command,
                                                                name, extra, fragments):
    from codistill.cli import main

    for key in [k for k in os.environ if k.startswith("TORCHELASTIC_")]:
        monkeypatch.delenv(key)
    for key, value in leftover(dead_port, **extra).items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()

    code = main([command, "--config", str(ROOT / "configs/digits_tiny.yaml"), "--out", str(tmp_path / "run")])

    seconds = time.monotonic() - start
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("codistill: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert seconds < 15, seconds  # the probe gives up after 5 s; a refused connection at once
    assert not (tmp_path / "run").exists()


def test_the_real_process_exits_2_in_seconds(tmp_path, dead_port):
    env = leftover(dead_port, TORCHELASTIC_USE_AGENT_STORE="True")
    proc, seconds = run_cli(env, tmp_path / "run", "train")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "cannot be reached" in lines[0], proc.stderr
    assert seconds < 60, seconds  # interpreter start and imports included, on a shared CPU
    assert not (tmp_path / "run").exists()


def test_the_probe_gives_up_within_its_limit_on_an_address_that_never_answers(monkeypatch):
    # An unroutable peer (TEST-NET-1, RFC 5737) drops the connection attempt instead of refusing it.
    from codistill import distributed
    from codistill.errors import UserError

    for key, value in leftover(9, TORCHELASTIC_USE_AGENT_STORE="True", MASTER_ADDR="192.0.2.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "RENDEZVOUS_PROBE_S", 1.0)
    start = time.monotonic()
    with pytest.raises(UserError, match="192.0.2.1:9 cannot be reached"):
        distributed.check_rendezvous()
    assert time.monotonic() - start < 5


def test_a_reachable_store_passes_the_probe(monkeypatch):
    import torch.distributed as dist

    from codistill import distributed

    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    for key, value in leftover(store.port, TORCHELASTIC_USE_AGENT_STORE="True").items():
        monkeypatch.setenv(key, value)
    distributed.check_rendezvous()  # no error
    store.set("still", "serving")  # the probe's connection left the store working
    assert store.get("still") == b"serving"
