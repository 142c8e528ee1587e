"""Performance benchmarks: `codistill bench NAME [--quick] [--out DIR]` (docs/performance.md).

    step_overhead  a codistillation step vs its floor (own step + (n-1) teacher forwards), one process
    bytes          bytes per worker per step, all-reduce vs codistillation: counters beside formulas
    slow_network   time to accuracy on two emulated machines joined by a shaped link (root, iproute2)
    stall          fraction of training time blocked in the exchange, synchronous vs asynchronous
    torchft_diloco our DiLoCo against torchft's (lighthouse + managers, gloo, CPU): curves and accuracy
    sweep          time to accuracy across link rates and model profiles; the cost model validated (root)
    straggler      time to accuracy with one machine at half speed (root, cgroup CPU quota)
    lm_memory      peak memory per worker of language-model codistillation, n = 1, 2, 4
    memory         peak memory per worker of every method, DDP and FSDP: measured and predicted

Each prints a markdown table and writes `<name>.md` and `<name>.json` in the output directory.
`--quick` runs a tiny version that checks the benchmark produces its table, not its speed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .common import Result, write_result

NAMES = ("step_overhead", "bytes", "slow_network", "stall", "torchft_diloco", "sweep", "straggler", "lm_memory", "memory")


def _runner(name: str) -> Callable[..., Result]:
    """The benchmark's run function (imported on demand: each pulls in different machinery)."""
    if name == "step_overhead":
        from .step_overhead import run
    elif name == "bytes":
        from .comm_bytes import run
    elif name == "slow_network":
        from .slow_network import run
    elif name == "stall":
        from .stall import run
    elif name == "torchft_diloco":
        from .torchft_diloco import run
    elif name == "sweep":
        from .sweep import run
    elif name == "straggler":
        from .straggler import run
    elif name == "lm_memory":
        from .lm_memory import run
    elif name == "memory":
        from .memory import run
    else:
        raise ValueError(f"unknown benchmark {name!r}; allowed: {', '.join(NAMES)}, all")
    return run


def run_benchmarks(name: str, quick: bool = False, out: str | Path | None = None) -> list[Result]:
    """Run one benchmark, or all of them in turn (`all`); print and save each table."""
    names = list(NAMES) if name == "all" else [name]
    out = (Path(out) if out else Path(f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")).resolve()
    results = []
    for n in names:
        print(f"== bench {n}{' (quick)' if quick else ''}", flush=True)
        result = _runner(n)(quick, out)
        write_result(out, result)
        print(result.markdown(), flush=True)
        results.append(result)
    print(f"wrote {', '.join(f'{r.name}.md' for r in results)} and .json in {out}", flush=True)
    return results


__all__ = ["NAMES", "Result", "run_benchmarks"]
