"""One intra-op thread in the test process: several test processes share 2 cores, and torch's
default thread pool makes them fight (a ResNet step went from 0.05 s to 6.8 s)."""

import torch

torch.set_num_threads(1)

# Workers of the product's own launcher (in this process and in every `codistill` subprocess, which
# inherit the environment) are forked from a fork server that imported torch once, not spawned fresh:
# see codistill.distributed.START_METHOD_ENV. test_cli.py::test_train_writes_run_directory keeps spawn.
import os  # noqa: E402

os.environ.setdefault("CODISTILL_START_METHOD", "forkserver")
