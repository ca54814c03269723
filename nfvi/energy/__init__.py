"""``nfvi energy``: fit a flow to a 2-D energy of the paper's Table 1 (Sec. 6.1, Fig. 3).

``config.py`` the schemas, ``model.py`` q_K and its exact density, ``task.py`` the loop, the estimates and the command,
``plots.py`` the run's figures.
"""

from nfvi.energy.config import EnergyConfig
from nfvi.energy.model import EnergyModel, log_density
from nfvi.energy.task import beta_at, evaluate, fit, run

__all__ = ["EnergyConfig", "EnergyModel", "beta_at", "evaluate", "fit", "log_density", "run"]
