"""Likelihoods p(x | z) for the VAE decoder: Bernoulli (binary images) and two for 8-bit images.

Each likelihood is a :class:`LikelihoodSpec`: how many parameters it reads per data value, which
kind of data it models (``binary`` or ``8bit``, :attr:`nfvi.data.ImageData.kind`), how to build the
distribution from the decoder's output, and how to set the decoder's output bias from the mean
training image. The decoder emits ``P = num_params`` blocks concatenated along the first event axis:
``(*, P*D)`` for flat data ``(D,)``, ``(*, P*C, H, W)`` for images ``(C, H, W)``.

8-bit images reach the likelihoods as ``x = k / 255`` with ``k`` in 0..255
(:meth:`nfvi.vae.model.VAE.prepare` converts uint8 tensors).

- ``discretized_logistic`` (``P = 2``: mean, log-scale; as in PixelCNN++ and IAF): the value ``k`` gets
  the mass of a logistic(mean, scale) on the bin ``[(k - 1/2)/255, (k + 1/2)/255]``, with the edge bins
  open (``k = 0`` takes ``(-inf, 1/2/255]``, ``k = 255`` takes ``[254.5/255, inf)``), so the 256 masses of
  a pixel sum to one and ``-ln p(x)`` is a proper discrete negative log-likelihood (nats; divide by
  ``D ln 2`` for bits per dimension). Computed in the log domain without cancellation:
  ``sigma(a) - sigma(b) = sigma(a) sigma(-b) (1 - exp(b - a))``. The log-scale has a soft floor,
  ``min_log_scale + softplus(raw - min_log_scale)`` with ``min_log_scale = -10`` (about 1/87 of a bin).
- ``logit_normal`` (``P = 1``: the mean of the logit; the reproductions' reading of the paper's CIFAR-10
  setup, docs/paper.md section 11): pixels are scaled into ``[lambda, 1 - lambda]``, ``y = lambda + (1 - 2 lambda) x``
  with ``lambda = 1e-4``, and ``logit(y) ~ N(mean, 1)``. This is a *density* on the scaled pixels (it can be
  negative, as the paper's Table 3 values are), not a discrete likelihood: no bits per dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Bernoulli, Distribution, Independent, constraints
from torch.distributions.utils import broadcast_all

__all__ = [
    "DiscretizedLogistic",
    "LogitNormal",
    "LikelihoodSpec",
    "SPECS",
    "split_params",
    "LEVELS",
    "LOGIT_NORMAL_LAMBDA",
    "MIN_LOG_SCALE",
]

LEVELS = 256  # 8-bit values
MIN_LOG_SCALE = -10.0
LOGIT_NORMAL_LAMBDA = 1e-4


def split_params(params: Tensor, num: int, event_dims: int) -> tuple[Tensor, ...]:
    """Split the decoder output ``(*, P*n, ...)`` into ``P`` blocks along the first event axis."""
    return params.chunk(num, dim=params.dim() - event_dims) if num > 1 else (params,)


class DiscretizedLogistic(Distribution):
    """A logistic(loc, exp(log_scale)) discretized to the ``levels`` values ``k / (levels - 1)`` of [0, 1].

    ``log_prob(x)`` rounds ``x * (levels - 1)`` to the nearest level. Edge bins are open, so the
    masses over all levels sum to one (see the module docstring). Element-wise (wrap in
    ``Independent`` for images).
    """

    arg_constraints = {"loc": constraints.real, "log_scale": constraints.real}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, loc: Tensor, log_scale: Tensor, levels: int = LEVELS, validate_args=False):
        self.loc, self.log_scale = broadcast_all(loc, log_scale)
        self.levels = int(levels)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        new.loc, new.log_scale = self.loc.expand(batch_shape), self.log_scale.expand(batch_shape)
        new.levels = self.levels
        super(DiscretizedLogistic, new).__init__(torch.Size(batch_shape), validate_args=False)
        return new

    @property
    def mean(self) -> Tensor:  # the logistic's mean, clipped to the data range (not the exact discrete mean)
        return self.loc.clamp(0.0, 1.0)

    def log_prob(self, x: Tensor) -> Tensor:
        top = self.levels - 1
        k = torch.round(x * top).clamp(0, top)
        inv_scale = torch.exp(-self.log_scale)
        upper = ((k + 0.5) / top - self.loc) * inv_scale  # a: standardized upper edge of the bin
        lower = ((k - 0.5) / top - self.loc) * inv_scale  # b: standardized lower edge
        log_cdf_upper = F.logsigmoid(upper)  # log sigma(a): the k = 0 bin (-inf, a]
        log_sf_lower = F.logsigmoid(-lower)  # log(1 - sigma(b)): the k = top bin [b, inf)
        # log(sigma(a) - sigma(b)) = log sigma(a) + log sigma(-b) + log(1 - exp(-(a - b))), a - b = inv_scale / top
        log_mid = log_cdf_upper + log_sf_lower + torch.log(-torch.expm1(-inv_scale / top))
        return torch.where(k == 0, log_cdf_upper, torch.where(k == top, log_sf_lower, log_mid))

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp_(1e-6, 1 - 1e-6)
        x = self.loc.expand(shape) + torch.exp(self.log_scale).expand(shape) * (torch.log(u) - torch.log1p(-u))
        top = self.levels - 1
        return torch.round(x * top).clamp_(0, top) / top


class LogitNormal(Distribution):
    """``logit(y) ~ N(loc, scale^2)`` for ``y = lam + (1 - 2 lam) x``: a density on the scaled value y.

    ``log_prob(x) = log N(logit(y); loc, scale) - log y - log(1 - y)`` (the density of y, as the
    reproductions report it; the constant ``D log(1 - 2 lam)`` to a density of x, -0.04 nats for
    192 values, is left out). Element-wise.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, loc: Tensor, scale: float | Tensor = 1.0, lam: float = LOGIT_NORMAL_LAMBDA, validate_args=False):
        self.loc, self.scale = broadcast_all(loc, scale)
        self.lam = float(lam)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LogitNormal, _instance)
        new.loc, new.scale, new.lam = self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.lam
        super(LogitNormal, new).__init__(torch.Size(batch_shape), validate_args=False)
        return new

    def scaled(self, x: Tensor) -> Tensor:
        """``y = lam + (1 - 2 lam) x``."""
        return self.lam + (1.0 - 2.0 * self.lam) * x

    def log_prob(self, x: Tensor) -> Tensor:
        y = self.scaled(x)
        t = torch.log(y) - torch.log1p(-y)
        z = (t - self.loc) / self.scale
        return -0.5 * z.square() - torch.log(self.scale) - 0.5 * math.log(2 * math.pi) - torch.log(y) - torch.log1p(-y)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        t = self.loc.expand(shape) + self.scale.expand(shape) * torch.randn(shape, dtype=self.loc.dtype)
        return ((torch.sigmoid(t) - self.lam) / (1.0 - 2.0 * self.lam)).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class LikelihoodSpec:
    """One ``model.likelihood`` option (see the module docstring)."""

    name: str
    num_params: int  # P: parameters per data value
    data_kind: str  # binary | 8bit
    discrete: bool  # True: -ln p(x) is a discrete NLL (bits/dim make sense)
    make: Callable[[Tensor, int], Distribution]  # (decoder output, event dims) -> distribution over x
    init_bias: Callable[[Tensor], Tensor]  # mean training value (D,) in [0, 1] -> output bias (P, D)


def _bernoulli(params: Tensor, event_dims: int) -> Distribution:
    return Independent(Bernoulli(logits=params, validate_args=False), event_dims, validate_args=False)


def _discretized_logistic(params: Tensor, event_dims: int) -> Distribution:
    loc, raw = split_params(params, 2, event_dims)
    log_scale = MIN_LOG_SCALE + F.softplus(raw - MIN_LOG_SCALE)
    return Independent(DiscretizedLogistic(loc, log_scale), event_dims, validate_args=False)


def _logit_normal(params: Tensor, event_dims: int) -> Distribution:
    return Independent(LogitNormal(params, 1.0), event_dims, validate_args=False)


def _logit(p: Tensor, eps: float = 1e-3) -> Tensor:
    return torch.logit(p.clamp(eps, 1 - eps))


def _init_discretized_logistic(mean: Tensor) -> Tensor:
    # mean block = the pixel mean; log-scale block: softplus^-1 so that log_scale = log(0.05) (about 13 levels)
    target = math.log(0.05) - MIN_LOG_SCALE
    raw = MIN_LOG_SCALE + math.log(math.expm1(target))
    return torch.stack([mean, torch.full_like(mean, raw)])


SPECS: dict[str, LikelihoodSpec] = {
    "bernoulli": LikelihoodSpec("bernoulli", 1, "binary", True, _bernoulli, lambda m: _logit(m)[None]),
    "discretized_logistic": LikelihoodSpec(
        "discretized_logistic", 2, "8bit", True, _discretized_logistic, _init_discretized_logistic
    ),
    "logit_normal": LikelihoodSpec(
        "logit_normal",
        1,
        "8bit",
        False,
        _logit_normal,
        lambda m: _logit(LOGIT_NORMAL_LAMBDA + (1 - 2 * LOGIT_NORMAL_LAMBDA) * m, eps=LOGIT_NORMAL_LAMBDA)[None],
    ),
}
