"""Normalizing flows as ``nn.Module`` stacks: where each layer's parameters come from.

The maths lives in :mod:`nfvi.transforms`; a module here owns (global) or computes (amortized)
the raw parameters and builds fresh transforms from them on every call. One public entry point::

    flow = build_flow("planar", dim=2, length=32)               # global parameters
    z_k, log_det = flow(z_0)                                     # z: (*, D), log_det: (*,)

    flow = build_flow("planar", dim=40, length=10, context_dim=400)   # amortized (paper Sec. 6.2)
    z_k, log_det = flow(z_0, context=h)                          # h: (*batch, 400), z_0: (*sample, *batch, 40)

``log_det = sum_k log|det df_k/dz_{k-1}|`` (paper Eq. 7), so ``log q_K(z_K) = log q_0(z_0) - log_det``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution

from nfvi.errors import NfviError, check_choice
from nfvi.transforms import (
    AdditiveCouplingTransform,
    FlowTransform,
    PlanarTransform,
    RadialTransform,
    planar_chain,
    planar_ladj,
    planar_u_hat,
)

__all__ = [
    "FLOW_KINDS",
    "Flow",
    "IdentityFlow",
    "PlanarFlow",
    "RadialFlow",
    "NICEFlow",
    "build_flow",
    "rsample_and_log_prob",
]

FLOW_KINDS = ("none", "planar", "radial", "nice")


class Flow(nn.Module):
    """A chain z_0 -> z_K. ``forward(z, context=None) -> (z_K, log_det)``; see module docstring."""

    length: int

    def transforms(self, context: Tensor | None = None) -> list[FlowTransform]:
        """The K layers' transforms, built from the current (or context-computed) parameters."""
        raise NotImplementedError

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_det = z.new_zeros(z.shape[:-1])
        for transform in self.transforms(context):
            z, ladj = transform.call_and_ladj(z)
            log_det = log_det + ladj
        return z, log_det


class IdentityFlow(Flow):
    """Length 0: ``z_K = z_0`` and ``log_det = 0``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim, self.length = dim, 0

    def transforms(self, context=None):
        return []


class _ElementwiseParamFlow(Flow):
    """K layers whose raw parameters are a ``(K, P)`` table (global) or an encoder head's output.

    Amortized (``context_dim > 0``): one fused ``nn.Linear(context_dim, K * P)`` head computes every
    layer's parameters per data point, ``raw`` of shape ``(*batch, K, P)``. Its weights start small
    and its bias at the global initialisation, so training starts near a fixed flow.
    """

    def __init__(self, dim: int, length: int, context_dim: int = 0):
        super().__init__()
        self.dim, self.length, self.context_dim = dim, length, context_dim
        init = torch.stack([self.init_raw(dim) for _ in range(length)])  # (K, P)
        if context_dim > 0:
            self.head = nn.Linear(context_dim, init.numel())
            with torch.no_grad():
                self.head.weight.mul_(1e-2)
                self.head.bias.copy_(init.flatten())
        else:
            self.raw = nn.Parameter(init)

    @property
    def num_params(self) -> int:
        raise NotImplementedError

    def init_raw(self, dim: int) -> Tensor:
        raise NotImplementedError

    def make(self, raw: Tensor) -> FlowTransform:
        raise NotImplementedError

    def raw_params(self, context: Tensor | None) -> Tensor:
        """``(K, P)`` for global flows, ``(*batch, K, P)`` for amortized ones."""
        if self.context_dim == 0:
            return self.raw
        if context is None:
            raise NfviError(f"this {type(self).__name__} is amortized (context_dim={self.context_dim}); pass context")
        return self.head(context).unflatten(-1, (self.length, -1))

    def transforms(self, context=None):
        raw = self.raw_params(context)
        return [self.make(raw[..., k, :]) for k in range(self.length)]


class PlanarFlow(_ElementwiseParamFlow):
    """Planar layers (Eq. 10), raw parameters ``[u (D), w (D), b (1)]`` per layer.

    ``w_floor``: guard against the amortized blow-up (docs/paper.md section 13). When an encoder emits
    ``w``, ``w`` crosses zero somewhere in input space and ``u_hat`` grows like ``1/||w||``. With a
    floor, ``w_1 = w_floor + softplus(w_1')`` so ``||w|| >= w_floor``; this loses no expressivity
    up to the floor, because ``(u, w, b)`` and ``(-u, -w, -b)`` give the same layer (tanh is odd).
    Default: 0.1 for amortized flows, off (None) for global ones.
    """

    def __init__(self, dim: int, length: int, context_dim: int = 0, w_floor: float | None = "auto"):
        self.w_floor = (0.1 if context_dim > 0 else None) if w_floor == "auto" else w_floor
        super().__init__(dim, length, context_dim)

    def init_raw(self, dim):
        u = torch.randn(dim) * 0.01
        w = torch.randn(dim) / math.sqrt(dim)
        if self.w_floor is not None:
            w[0] = 0.0
        return torch.cat([u, w, torch.zeros(1)])

    def _split(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d = self.dim
        u, w, b = raw[..., :d], raw[..., d : 2 * d], raw[..., 2 * d]
        if self.w_floor is not None:
            w = torch.cat([self.w_floor + F.softplus(w[..., :1]), w[..., 1:]], dim=-1)
        return u, w, b

    def make(self, raw):
        return PlanarTransform(*self._split(raw))

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Same maths as chaining :meth:`transforms` (``PlanarTransform.call_and_ladj``), fewer kernels.

        Speed: the reparameterisation (``w`` floor, ``u_hat``, ``w.u``) runs once on all K layers'
        ``(*batch, K, P)`` parameters; the sequential loop (:func:`nfvi.transforms.planar_chain`, one
        autograd node with a hand-written backward) does only ``a = w.z + b``, ``tanh`` and the update
        of ``z``; the log-determinants of all layers are then evaluated together.
        """
        u, w, b = self._split(self.raw_params(context))  # (*batch, K, D), (*batch, K, D), (*batch, K)
        z, pre = planar_chain(z, w, planar_u_hat(u, w), b)
        ladj = planar_ladj(pre, torch.tanh(pre), (w * u).sum(-1))  # (*sample, *batch, K)
        return z, ladj.sum(-1)


class RadialFlow(_ElementwiseParamFlow):
    """Radial layers (Eq. 14), raw parameters ``[z0 (D), alpha' (1), beta' (1)]`` per layer.

    Initialised with ``beta = 0`` (the identity) and ``alpha = softplus(0)``.
    """

    def init_raw(self, dim):
        return torch.cat([torch.randn(dim), torch.zeros(2)])

    def make(self, raw):
        d = self.dim
        return RadialTransform(raw[..., :d], raw[..., d], raw[..., d + 1])


class _CouplingNet(nn.Module):
    """MLP shift ``m(z_a [, context])`` for one NICE layer; the last layer starts at zero (identity)."""

    def __init__(self, n_in: int, n_out: int, hidden: int, context_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_in + context_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_out),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z_a: Tensor, context: Tensor | None) -> Tensor:
        if context is not None:
            context = context.expand(*z_a.shape[:-1], context.shape[-1])
            z_a = torch.cat([z_a, context], dim=-1)
        return self.net(z_a)


class NICEFlow(Flow):
    """NICE, the paper's volume-preserving baseline: K additive couplings, ``log_det = 0``.

    ``mix="alternate"`` swaps which half is shifted between layers; ``mix="permute"`` splits by a
    fixed random permutation per layer (seeded, stored as a buffer). When ``context_dim > 0``,
    each coupling net also reads the context (the amortized variant used in the VAE).
    """

    def __init__(self, dim: int, length: int, context_dim: int = 0, hidden: int = 64, mix: str = "alternate"):
        super().__init__()
        if dim < 2:
            raise NfviError(f"flow=nice needs a latent dimension of at least 2, got dim={dim}")
        check_choice("flow.mix", mix, ("alternate", "permute"))
        self.dim, self.length, self.context_dim, self.mix = dim, length, context_dim, mix
        gen = torch.Generator().manual_seed(0)
        half = dim // 2
        for k in range(length):
            if mix == "permute":
                order = torch.randperm(dim, generator=gen)
            else:
                order = torch.arange(dim) if k % 2 == 0 else torch.arange(dim).roll(-half)
            self.register_buffer(f"keep_{k}", order[:half].clone())
            self.register_buffer(f"change_{k}", order[half:].clone())
        self.nets = nn.ModuleList(_CouplingNet(half, dim - half, hidden, context_dim) for _ in range(length))

    def transforms(self, context=None):
        if self.context_dim == 0:
            context = None  # a global flow ignores any context it is given
        elif context is None:
            raise NfviError(f"this NICEFlow is amortized (context_dim={self.context_dim}); pass context")
        return [
            AdditiveCouplingTransform(
                lambda z_a, net=net: net(z_a, context), getattr(self, f"keep_{k}"), getattr(self, f"change_{k}")
            )
            for k, net in enumerate(self.nets)
        ]


def build_flow(kind: str, dim: int, length: int, context_dim: int = 0, **options) -> Flow:
    """Build a flow of ``length`` layers of ``kind`` on R^dim.

    Args:
        kind: one of ``FLOW_KINDS``: ``planar``, ``radial``, ``nice``; ``none`` (or length 0) is the identity.
        dim: event dimension D.
        length: number of layers K >= 0.
        context_dim: 0 for global parameters; > 0 to compute them from a context vector (amortized).
        options: kind-specific: ``w_floor`` (planar), ``hidden`` and ``mix`` (nice).
    """
    check_choice("flow", kind, FLOW_KINDS)
    if not isinstance(length, int) or length < 0:
        raise NfviError(f"flow.length={length!r} is not allowed; use a whole number >= 0")
    if kind == "none" or length == 0:
        return IdentityFlow(dim)
    cls = {"planar": PlanarFlow, "radial": RadialFlow, "nice": NICEFlow}[kind]
    return cls(dim, length, context_dim, **options)


def rsample_and_log_prob(
    base: Distribution, flow: Flow, sample_shape: torch.Size | tuple = (), context: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Draw ``z_K = flow(z_0)``, ``z_0 ~ base``, and return ``(z_K, log q_K(z_K))`` (paper Eq. 7).

    ``base`` has event shape ``(D,)`` (e.g. ``Independent(Normal(mu, sigma), 1)``); the result has
    shapes ``(*sample_shape, *base.batch_shape, D)`` and ``(*sample_shape, *base.batch_shape)``.
    """
    z0 = base.rsample(sample_shape)
    z_k, log_det = flow(z0, context)
    return z_k, base.log_prob(z0) - log_det
