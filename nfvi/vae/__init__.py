"""The DLGM/VAE of paper Sec. 6.2 (:mod:`nfvi.vae.model`) and its objectives (:mod:`nfvi.vae.objectives`)."""

from __future__ import annotations

from nfvi.vae.model import VAE, ModelConfig, PosteriorSample, build_model
from nfvi.vae.objectives import ANNEALING, annealed_loss, beta_schedule, free_energy_terms

__all__ = [
    "ANNEALING",
    "VAE",
    "ModelConfig",
    "PosteriorSample",
    "annealed_loss",
    "beta_schedule",
    "build_model",
    "free_energy_terms",
]
