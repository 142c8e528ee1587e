"""Issue 12's untrained teachers: constant alpha vs burn-in (alpha_steps = T), seeds 0..N-1.

    python docs/peers/untrained_teachers_measure.py OUT [SEEDS]     # about 1.5 minutes per seed and variant

Fashion-MNIST with data.fraction=0.15 (about 8,000 training images, like the issue's small user data
set), the suite's width-8 CNN, the `codistill` arm of `compare` on 4 workers (2 models x 2), 6 epochs
= 186 updates, T = 50 (S < 4 T: the pre-launch warning fires). One JSON row per finished run is
appended to OUT/rows.jsonl, and a run whose row exists is not run again (resumable).
"""
import json
import sys
import time
from pathlib import Path

from codistill.compare import arm_configs
from codistill.config import load_config, replace


def main():
    from codistill.bench.local import run_local

    out, seeds = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 3
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.jsonl"
    done = {(r["variant"], r["seed"]) for r in map(json.loads, rows_file.read_text().splitlines())} \
        if rows_file.exists() else set()
    for seed in range(seeds):
        base = load_config(None, ["data.fraction=0.15", "train.epochs=6", "model.options={width: 8, hidden: 64}",
                                  "train.progress=false", "compare.arms=[codistill]", f"train.seed={seed}"])
        (_, cd), = arm_configs(base, 4)
        T = cd.codistill.exchange_every
        variants = [("constant", cd), ("burnin", replace(cd, codistill__alpha_schedule="burnin",
                                                          codistill__alpha_steps=T))]
        for name, cfg in variants:
            if (name, seed) in done:
                continue
            t0 = time.time()
            s = run_local([(name, cfg)], 4, out / f"seed{seed}")[name]
            row = {"variant": name, "seed": seed, "steps": s["steps"], "T": T,
                   "val_acc": [m["val_accuracy"] for m in s["models"]],
                   "test_acc": [m["test_accuracy"] for m in s["models"]],
                   "val_loss": [m["val_loss"] for m in s["models"]], "wall": round(time.time() - t0, 1)}
            with rows_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
