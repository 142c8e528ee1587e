"""codistill: distributed codistillation with a matched all-reduce baseline.

The method as one object around your model and optimizer (under torchrun):

    codist = Codistillation(make_net, n_models=2, every=50, alpha=1.0)
    loader = DataLoader(ds, batch_size=32, sampler=codist.sampler(ds))
    optimizer = torch.optim.SGD(codist.model.parameters(), lr=0.1)
    with codist.attach(optimizer):
        for x, y in loader:
            losses = codist.loss(codist.model(x), y, teacher_inputs=x)
            optimizer.zero_grad(); losses["total"].backward(); optimizer.step()

Its parts (Topology, Teachers, Exchanger, codistillation_loss) are exported too.
"""

from .accounting import CommCounter
from .codistillation import Codistillation
from .config import Config, load_config
from .distributed import init_distributed, shutdown
from .errors import ConfigError, DataError, UserError
from .exchange import Exchanger, Teachers
from .losses import codistillation_loss, distillation_loss
from .topology import Grid, Topology, build_topology

__version__ = "0.1.0"

__all__ = [
    "Codistillation", "CommCounter", "Config", "ConfigError", "DataError", "Exchanger", "Grid", "Teachers", "Topology",
    "UserError", "build_topology", "codistillation_loss", "distillation_loss", "init_distributed",
    "load_config", "shutdown",
]
