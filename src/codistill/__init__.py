"""codistill: distributed codistillation with a matched all-reduce baseline.

The method is one object around your model and optimizer, `Codistillation` (its module's
docstring shows the loop, under torchrun). Its parts (Topology, Teachers, Exchanger,
codistillation_loss) are exported too.
"""

from .accounting import CommCounter
from .codistillation import Codistillation
from .config import Config, load_config
from .distributed import init_distributed, shutdown
from .errors import ConfigError, DataError, UserError
from .exchange import Exchanger, Teachers
from .losses import codistillation_loss, distillation_loss
from .topology import Grid, Topology, build_topology
from .version import __version__ as __version__

__all__ = [
    "Codistillation", "CommCounter", "Config", "ConfigError", "DataError", "Exchanger", "Grid", "Teachers", "Topology",
    "UserError", "build_topology", "codistillation_loss", "distillation_loss", "init_distributed",
    "load_config", "shutdown",
]
