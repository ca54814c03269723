"""nfvi: variational inference with normalizing flows (Rezende & Mohamed, ICML 2015).

Public API: :mod:`nfvi.flows` (``build_flow``, ``FlowDistribution``), :mod:`nfvi.transforms`,
:mod:`nfvi.energies` (``ENERGIES``), :func:`nfvi.load_model` and :mod:`nfvi.evaluate`
(``log_marginal_likelihood``; the estimators live in :mod:`nfvi.estimators`).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def load_model(run_dir, which: str = "best", device="cpu"):
    """The trained VAE of a ``nfvi train`` run directory, in eval mode, on ``device`` (see :mod:`nfvi.vae.model`).

    ``which="best"``: ``best.pt`` (the best validation bound) when the run has one, else the last checkpoint;
    ``which="last"``: ``checkpoint.pt``.
    """
    from nfvi.vae.checkpoint import load_model as _load

    return _load(run_dir, which=which, device=device)
