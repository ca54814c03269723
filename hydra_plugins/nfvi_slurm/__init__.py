"""nfvi's SLURM launcher as a Hydra plugin (``hydra/launcher=slurm``); the code is in :mod:`nfvi.slurm`."""
