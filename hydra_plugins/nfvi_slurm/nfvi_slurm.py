"""The ``_target_`` of ``hydra/launcher=slurm``: :class:`nfvi.slurm.SlurmLauncher` under ``hydra_plugins``, where Hydra
requires its plugins to be. Without the ``launchers`` extra (hydra-submitit-launcher) there is nothing to register."""

from __future__ import annotations

try:
    from nfvi.slurm import SlurmLauncher as _NfviSlurmLauncher
except ImportError:  # hydra-submitit-launcher is not installed: no hydra/launcher=slurm
    pass
else:

    class SlurmLauncher(_NfviSlurmLauncher):
        """:class:`nfvi.slurm.SlurmLauncher` (a failed job exits 1, a restarted job resumes, no endless wait)."""
