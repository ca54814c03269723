"""Free energy (negative ELBO) terms and the annealed training losses (paper Eq. 15 and Eq. 20).

Per data point, with ``z_0 ~ q_0(z | x)`` and ``z_K = f_K o ... o f_1(z_0)``::

    F(x) = E[log q_0(z_0)] - E[sum_k log|det J_k|] - E[log p(x | z_K)] - E[log p(z_K)]      (Eq. 15)
         = E[log q_K(z_K)] - E[log p(x, z_K)] = -elbo

The prior is evaluated at **z_K**, never z_0 (docs/paper.md section 1.1). Everything here returns
per-data-point tensors ``(B,)``; only the training loop reduces them.

Annealing (``mode``):

* ``eq20`` (the paper): ``log q_K - beta_t (log p(x|z_K) + log p(z_K))``: beta multiplies the whole
  log joint, ``beta_t = min(1, 0.01 + t/10000)`` with t the parameter-update index.
* ``kl_warmup`` (later convention, e.g. Sylvester flows): ``-log p(x|z_K) + beta_t (log q_K - log p(z_K))``.
* ``none``: ``-elbo``.

At ``beta = 1`` all three equal ``-elbo``.
"""

from __future__ import annotations

from torch import Tensor

from nfvi.training import beta_schedule as eq20

__all__ = ["ANNEALING", "TERMS", "beta_schedule", "free_energy_terms", "annealed_loss"]

ANNEALING = ("eq20", "kl_warmup", "none")
TERMS = ("log_px_z", "log_pz", "log_q0", "log_det", "log_qk", "elbo")


def beta_schedule(step: int, mode: str, start: float = 0.01, steps: int = 10000) -> float:
    """Inverse temperature at update ``step`` (0-based): ``min(1, start + step/steps)``; ``none`` gives 1.

    A thin alias of :func:`nfvi.training.beta_schedule` (Eq. 20) taking the annealing ``mode``.
    """
    return eq20(step, start, steps, anneal=mode != "none")


def free_energy_terms(model, x: Tensor, num_samples: int = 1) -> dict[str, Tensor]:
    """Monte Carlo terms of the free energy, each ``(B,)`` and averaged over ``num_samples`` paths.

    Keys: ``log_px_z`` = E log p(x|z_K); ``log_pz`` = E log p(z_K); ``log_q0`` = E log q_0(z_0);
    ``log_det`` = E sum_k log|det J_k|; ``log_qk`` = E log q_K(z_K) = log_q0 - log_det;
    ``elbo`` = log_px_z + log_pz - log_qk. Differentiable (reparameterised) for training.

    ``model`` needs ``sample_posterior(x, S)`` (a :class:`~nfvi.vae.model.PosteriorSample`),
    ``log_likelihood(x, z)`` and ``prior``, as :class:`~nfvi.vae.model.VAE` has.
    """
    sample = model.sample_posterior(x, num_samples)
    log_px_z = model.log_likelihood(x, sample.z_k)
    log_pz = model.prior.log_prob(sample.z_k)  # at z_K (Eq. 15), not z_0
    log_qk = sample.log_q0 - sample.log_det
    terms = {
        "log_px_z": log_px_z,
        "log_pz": log_pz,
        "log_q0": sample.log_q0,
        "log_det": sample.log_det,
        "log_qk": log_qk,
        "elbo": log_px_z + log_pz - log_qk,
    }
    return {key: value.mean(0) for key, value in terms.items()}


def annealed_loss(terms: dict[str, Tensor], beta: float, mode: str) -> Tensor:
    """Per-data-point loss ``(B,)`` to ``.mean()``: see the module docstring for each ``mode``."""
    if mode == "eq20":
        return terms["log_qk"] - beta * (terms["log_px_z"] + terms["log_pz"])
    if mode == "kl_warmup":
        return -terms["log_px_z"] + beta * (terms["log_qk"] - terms["log_pz"])
    return -terms["elbo"]
