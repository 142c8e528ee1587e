"""codistill: distributed codistillation with a matched all-reduce baseline.

The parts the trainer is built from, for use in your own training loop:

    ctx = init_distributed()                         # under torchrun
    topo = build_topology(n_models=2)                # rows: model groups, columns: exchange groups
    model = DDP(net, process_group=topo.model_group) # gradient all-reduce inside the model group
    teachers = Teachers({j: make_net() for j in topo.peers()})
    exchanger = Exchanger(net, teachers, topo, every=50)
    exchanger.maybe_exchange(step)                   # at the start of each step
    losses = codistillation_loss(model(x), teachers.logits(x), y, alpha=1.0)
"""

from .accounting import CommCounter
from .config import Config, load_config
from .distributed import init_distributed, shutdown
from .errors import ConfigError, DataError, UserError
from .exchange import Exchanger, Teachers
from .losses import codistillation_loss, distillation_loss
from .topology import Grid, Topology, build_topology

__version__ = "0.1.0"

__all__ = [
    "CommCounter", "Config", "ConfigError", "DataError", "Exchanger", "Grid", "Teachers", "Topology",
    "UserError", "build_topology", "codistillation_loss", "distillation_loss", "init_distributed",
    "load_config", "shutdown",
]
