"""Public alias of :mod:`nfvi.estimators` (``from nfvi.evaluate import log_marginal_likelihood`` keeps working).

The estimators live in :mod:`nfvi.estimators`; the ``nfvi evaluate`` command lives in :mod:`nfvi.vae.evaluate`.
"""

from nfvi.estimators import (  # noqa: F401
    default_batch_size,
    elbo,
    log_marginal_likelihood,
    log_weights,
    nats_to_bits_per_dim,
)

__all__ = ["default_batch_size", "elbo", "log_marginal_likelihood", "log_weights", "nats_to_bits_per_dim"]
