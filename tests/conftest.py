"""One intra-op thread in the test process: several test processes share 2 cores, and torch's
default thread pool makes them fight (a ResNet step went from 0.05 s to 6.8 s)."""

import torch

torch.set_num_threads(1)
