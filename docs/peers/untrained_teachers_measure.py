# One quick measurement for issue 12's untrained teachers: constant alpha vs burn-in (alpha_steps = T).
import json, sys, time
from pathlib import Path
from codistill.config import load_config, replace
from codistill.compare import arm_configs

def main():
    from codistill.bench.local import run_local

    base = load_config(None, ["data.fraction=0.15", "train.epochs=6", "model.options={width: 8, hidden: 64}",
                              "train.progress=false", "compare.arms=[codistill]", "train.seed=0"])
    (_, cd), = arm_configs(base, 4)
    runs = [("constant", cd), ("burnin", replace(cd, codistill__alpha_schedule="burnin", codistill__alpha_steps=cd.codistill.exchange_every))]
    t0 = time.time()
    res = run_local(runs, 4, Path(sys.argv[1]))
    for name, s in res.items():
        print(name, s["steps"], "T", s["exchange_every"], [round(100 * m["val_accuracy"], 2) for m in s["models"]],
              [round(100 * m["test_accuracy"], 2) for m in s["models"]], round(s["wall_seconds"]))
    print("total", round(time.time() - t0))


if __name__ == "__main__":
    main()
