"""Normalizing flows as ``nn.Module`` stacks: where each layer's parameters come from.

The maths lives in :mod:`nfvi.transforms`; a module here owns (global) or computes (amortized)
the raw parameters and builds fresh transforms from them on every call. One public entry point::

    flow = build_flow("planar", dim=2, length=32)               # global parameters
    z_k, log_det = flow(z_0)                                     # z: (*, D), log_det: (*,)

    flow = build_flow("planar", dim=40, length=10, context_dim=400)   # amortized (paper Sec. 6.2)
    z_k, log_det = flow(z_0, context=h)                          # h: (*batch, 400), z_0: (*sample, *batch, 40)

``log_det = sum_k log|det df_k/dz_{k-1}|`` (paper Eq. 7), so ``log q_K(z_K) = log q_0(z_0) - log_det``.

Kinds: ``planar`` and ``radial`` (the paper), ``nice`` (Dinh et al. 2014), ``iaf`` (Kingma et al. 2016),
``householder`` (Tomczak & Welling 2016) and ``sylvester`` (van den Berg et al. 2018). ``flow.inverse(z_K,
context)`` maps back to z_0 for every kind but Sylvester; :class:`FlowDistribution` wraps a base and a flow
as a ``torch.distributions.Distribution``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution

from nfvi.checks import check_flow_input
from nfvi.config import MAX_FLOW_LENGTH, MAX_WIDTH
from nfvi.distributions import FlowDistribution
from nfvi.errors import NfviError, check_choice, check_int_range, check_range
from nfvi.transforms import (
    AdditiveCouplingTransform,
    FlowTransform,
    HouseholderTransform,
    IAFTransform,
    PlanarTransform,
    RadialTransform,
    SylvesterTransform,
    bjorck_orthonormalize,
    coupling_chain,
    coupling_context_terms,
    householder_matrix,
    log1p_tanh_product,
    planar_chain_packed,
    planar_split,
)

__all__ = [
    "FLOW_KINDS",
    "Flow",
    "IdentityFlow",
    "PlanarFlow",
    "RadialFlow",
    "NICEFlow",
    "IAFFlow",
    "HouseholderFlow",
    "SylvesterFlow",
    "SYLVESTER_VARIANTS",
    "FLOW_OPTIONS",
    "FlowDistribution",
    "build_flow",
    "rsample_and_log_prob",
]

FLOW_KINDS = ("none", "planar", "radial", "nice", "iaf", "householder", "sylvester")
SYLVESTER_VARIANTS = ("orthogonal", "householder", "triangular")
#: the keyword options ``build_flow`` accepts for each kind
FLOW_OPTIONS = {
    "none": (),
    "planar": ("w_floor",),
    "radial": (),
    "nice": ("hidden", "mix"),
    "iaf": ("hidden", "num_hidden"),
    "householder": (),
    "sylvester": ("variant", "num_vectors", "num_householder"),
}


class Flow(nn.Module):
    """A chain z_0 -> z_K. ``forward(z, context=None) -> (z_K, log_det)``; see module docstring."""

    length: int

    def extra_repr(self) -> str:
        """``dim=D, length=K, context_dim=C`` and the kind's options, so ``repr(build_flow("planar", 2, 3))`` is
        ``PlanarFlow(dim=2, length=3, context_dim=0)`` (the class names the kind)."""
        text = f"dim={self.dim}, length={self.length}, context_dim={getattr(self, 'context_dim', 0)}"
        names = {"orthogonal": ("num_vectors",), "householder": ("num_householder",)}.get(
            getattr(self, "variant", ""), ()
        )
        for name in ("mix", "variant", *names, "w_floor"):
            if getattr(self, name, None) is not None:
                text += f", {name}={getattr(self, name)!r}"
        return text

    def transforms(self, context: Tensor | None = None) -> list[FlowTransform]:
        """The K layers' transforms, built from the current (or context-computed) parameters."""
        raise NotImplementedError

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_flow_input(self, z, context)
        log_det = z.new_zeros(z.shape[:-1])
        for transform in self.transforms(context):
            z, ladj = transform.call_and_ladj(z)
            log_det = log_det + ladj
        return z, log_det

    def inverse(self, z_k: Tensor, context: Tensor | None = None) -> Tensor:
        """``z_0 = f_1^{-1}(... f_K^{-1}(z_K))``: each layer's ``inv`` in reverse order, at any point ``(*, D)``.

        A point whose preimage leaves the dtype's range (see :meth:`inverse_with_overflow`) comes back as ``+inf``
        in every coordinate, never NaN.
        """
        z_0, overflow = self.inverse_with_overflow(z_k, context)
        return torch.where(overflow.unsqueeze(-1), math.inf, z_0)

    def inverse_with_overflow(self, z_k: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z_0, overflow)``: the inverse of :meth:`inverse` and a bool mask ``(*batch)`` of the points whose
        preimage overflowed (an intermediate ``z_k`` of a finite input became non-finite: e.g. an IAF far from its
        mass divides by ``sigma`` K times). Those rows of ``z_0`` are 0 (later layers ran on 0 instead of spreading
        NaN); a NaN input stays NaN. :meth:`FlowDistribution.log_prob` gives them ``-inf``: their preimage lies
        beyond the float range, where ``log q_0`` is below the most negative float.
        """
        check_flow_input(self, z_k, context, name="z_k")
        z, overflow = z_k, torch.isinf(z_k).any(-1)
        for transform in reversed(self.transforms(context)):
            z = transform.inv(z)
            overflow = overflow | ~torch.isfinite(z).all(-1)
            z = torch.where(overflow.unsqueeze(-1), 0.0, z)
        nan_in = torch.isnan(z_k).any(-1)
        return torch.where(nan_in.unsqueeze(-1), math.nan, z), overflow & ~nan_in


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
    and its bias at the global initialisation, so training starts near a fixed flow. The head's weight is stored
    column-major (``weight.t()`` is contiguous; the same ``(K * P, context_dim)`` parameter and values): its
    forward product and its weight gradient then run in BLAS's untransposed layout, 1.3 ms faster per update of
    Table 2's K=80 model on one CPU thread, where the weight is 10 MB (docs/performance.md).
    """

    def __init__(self, dim: int, length: int, context_dim: int = 0):
        super().__init__()
        self.dim, self.length, self.context_dim = dim, length, context_dim
        init = torch.stack([self.init_raw(dim) for _ in range(length)])  # (K, P)
        self.num_params = init.shape[-1]  # P, raw parameters per layer
        if context_dim > 0:
            self.head = nn.Linear(context_dim, init.numel())
            with torch.no_grad():
                self.head.weight.mul_(1e-2)
                self.head.bias.copy_(init.flatten())
            self.head.weight = nn.Parameter(self.head.weight.detach().t().contiguous().t())  # column-major
        else:
            self.raw = nn.Parameter(init)

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
        return planar_split(raw, self.w_floor)

    def make(self, raw):
        return PlanarTransform(*self._split(raw))

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Same maths as chaining :meth:`transforms` (``PlanarTransform.call_and_ladj``), fewer kernels.

        Speed: :func:`nfvi.transforms.planar_chain_packed`, one autograd node with a hand-written backward over
        the ``(*batch, K, P)`` raw parameters: the ``w`` floor, ``u_hat`` (Appendix A.1), the K layers and all
        log-determinants in the exact form (no clamp); on the CPU in the compiled kernel (:mod:`nfvi.kernels`),
        which reads the parameters in place and writes their gradient whole.
        """
        check_flow_input(self, z, context)
        return planar_chain_packed(z, self.raw_params(context), self.w_floor)  # raw (*batch, K, 2D + 1)


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
    """MLP shift ``m(z_a [, context])`` for one NICE layer; the last layer starts at zero (identity).

    The first layer reads ``[z_a, context]`` (weight ``(hidden, n_in + context_dim)``); its context part
    ``W_c @ context`` is passed in precomputed (``context_term``, ``(*batch, hidden)``), so that
    :class:`NICEFlow` computes it for all K layers in one matrix product and once per data point rather than
    once per sample: the same function, with a fraction of the small matrix products.
    """

    def __init__(self, n_in: int, n_out: int, hidden: int, context_dim: int):
        super().__init__()
        self.n_in = n_in
        self.net = nn.Sequential(
            nn.Linear(n_in + context_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_out),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z_a: Tensor, context_term: Tensor | None) -> Tensor:
        first = self.net[0]
        h = F.linear(z_a, first.weight[:, : self.n_in], first.bias)
        if context_term is not None:  # (*sample, *batch, hidden) + (*batch, hidden), broadcast from the right
            h = h + context_term
        return self.net[1:](h)


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

    def _context(self, context: Tensor | None) -> Tensor | None:
        if self.context_dim == 0:
            return None  # a global flow ignores any context it is given
        if context is None:
            raise NfviError(f"this NICEFlow is amortized (context_dim={self.context_dim}); pass context")
        return context

    def _splits(self) -> list[tuple[Tensor, Tensor]]:
        return [(getattr(self, f"keep_{k}"), getattr(self, f"change_{k}")) for k in range(self.length)]

    def _params(self) -> list[tuple[Tensor, ...]]:
        """Each coupling net's ``(W1, b1, W2, b2, W3, b3)``, as :func:`nfvi.transforms.coupling_chain` takes them."""
        return [tuple(t for layer in net.net[::2] for t in (layer.weight, layer.bias)) for net in self.nets]

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z_K, 0)``: the K couplings in one pass (:func:`nfvi.transforms.coupling_chain`); same result as
        chaining :meth:`transforms`, which :meth:`inverse` uses."""
        check_flow_input(self, z, context)
        context = self._context(context)
        if self.length == 0:
            return z, z.new_zeros(z.shape[:-1])
        z_k = coupling_chain(z, context, self._params(), self._splits())
        return z_k, z_k.new_zeros(z_k.shape[:-1])

    def transforms(self, context=None):
        context = self._context(context)
        terms = [None] * self.length
        if context is not None and self.length > 0:  # W_c @ context of every layer in one product
            terms = coupling_context_terms(context, self._params(), self._splits())[1]
        return [
            AdditiveCouplingTransform(lambda z_a, net=net, term=term: net(z_a, term), keep, change)
            for net, term, (keep, change) in zip(self.nets, terms, self._splits(), strict=True)
        ]


def _check_int(key: str, value, low: int, high: int | None = None) -> None:
    """A one-line :class:`NfviError` unless ``value`` is a whole number in ``[low, high]``."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or value < low or (high is not None and value > high):
        allowed = f"a whole number >= {low}" if high is None else f"a whole number in [{low}, {high}]"
        raise NfviError(f"{key}={value!r} is not allowed; use {allowed}")


class _MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 ``mask`` ``(out, in)`` (MADE, Germain et al. 2015)."""

    def __init__(self, mask: Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


#: the initial value of each IAF step's gate bias (``s``'s output bias): the Sylvester authors' forget bias
IAF_GATE_BIAS = 1.0


class _MADE(nn.Module):
    """Autoregressive conditioner of one IAF layer: ``z (*, D) [, context term] -> (m, s)``, each ``(*, D)``.

    Variable ``order[j]`` gets degree ``j + 1``; hidden units degrees in ``1..D-1`` (cyclic); a unit sees
    the units of lower or equal degree and an output of degree d those below d, so ``m_i``, ``s_i`` depend
    on the variables before i in ``order`` only. ``num_hidden`` masked hidden layers of width ``hidden``, ELU after
    each; the context term (``(*batch, hidden)``, computed once per flow by :class:`IAFFlow`) is added after the
    first ELU, as in the Sylvester authors' IAF (Kingma et al. 2016, their ``h``). With ``D = 1`` no hidden unit sees
    z: ``m`` and ``s`` are functions of the context (or constants). ``s`` starts near +1 (the authors' gate bias, a
    constant +1 added to ``s``; here the bias's initial value) so that ``sigma = sigmoid(s) ~ 0.73``, and the output
    weights start small (x 0.01), so ``m`` starts near 0.
    """

    def __init__(self, order: Tensor, hidden: int, num_hidden: int):
        super().__init__()
        dim = order.numel()
        deg_in = torch.empty(dim, dtype=torch.long)
        deg_in[order] = torch.arange(1, dim + 1)
        deg_h = torch.arange(hidden) % (dim - 1) + 1 if dim > 1 else torch.zeros(hidden, dtype=torch.long)
        layers = [_MaskedLinear(deg_h[:, None] >= deg_in[None, :])]
        layers += [_MaskedLinear(deg_h[:, None] >= deg_h[None, :]) for _ in range(num_hidden - 1)]
        self.hidden_layers = nn.ModuleList(layers)
        self.out = _MaskedLinear((deg_in[:, None] > deg_h[None, :]).repeat(2, 1))  # [m; s]
        with torch.no_grad():
            self.out.weight.mul_(1e-2)
            self.out.bias.zero_()
            self.out.bias[dim:] = IAF_GATE_BIAS

    def forward(self, z: Tensor, context_term: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = F.elu(self.hidden_layers[0](z))
        if context_term is not None:
            h = h + context_term  # broadcasts (*sample, *batch, H) + (*batch, H)
        for layer in self.hidden_layers[1:]:
            h = F.elu(layer(h))
        m, s = self.out(h).chunk(2, dim=-1)
        return m, s


class IAFFlow(Flow):
    """Inverse autoregressive flow (Kingma et al. 2016): K gated steps :class:`nfvi.transforms.IAFTransform`.

    Each step's ``(m, s)`` comes from its own MADE (:class:`_MADE`, ``num_hidden`` masked hidden layers of
    width ``hidden``, ELU); the autoregressive order is reversed between layers (layer k uses
    ``0..D-1`` for even k and ``D-1..0`` for odd k), so no coordinate is always first. Amortized
    (``context_dim > 0``): one ``Linear(context_dim, hidden)`` shared by the K steps maps the context to a term added
    after each MADE's first ELU, as the Sylvester authors' IAF (``IAFVAE.h_context``). Their ``IAF(num_hidden=1)``,
    two masked layers per step, is ``num_hidden=2`` here (``posterior=snf_iaf``): z=64, K=4, width 320 and 256
    context features give their 740,672 flow parameters.
    """

    def __init__(self, dim: int, length: int, context_dim: int = 0, hidden: int = 64, num_hidden: int = 1):
        super().__init__()
        _check_int("flow.hidden", hidden, 1)
        _check_int("flow.num_hidden", num_hidden, 1)
        self.dim, self.length, self.context_dim = dim, length, context_dim
        orders = [torch.arange(dim) if k % 2 == 0 else torch.arange(dim).flip(0) for k in range(length)]
        self.nets = nn.ModuleList(_MADE(order, hidden, num_hidden) for order in orders)
        for k, order in enumerate(orders):
            self.register_buffer(f"order_{k}", order)
        self.context_layer = nn.Linear(context_dim, hidden) if context_dim > 0 else None

    def transforms(self, context=None):
        term = None
        if self.context_dim > 0:
            if context is None:
                raise NfviError(f"this IAFFlow is amortized (context_dim={self.context_dim}); pass context")
            term = self.context_layer(context)  # (*batch, hidden), once for the K steps
        return [
            IAFTransform(lambda z, net=net: net(z, term), getattr(self, f"order_{k}"))
            for k, net in enumerate(self.nets)
        ]


class HouseholderFlow(_ElementwiseParamFlow):
    """Householder flow (Tomczak & Welling 2016): K reflections, raw parameters ``v (D)`` per layer.

    Volume preserving (``log_det = 0``) and self-inverse per layer: a product of reflections is an
    orthogonal map, which turns a diagonal Gaussian base into a full-covariance one (their VAE posterior).
    """

    def init_raw(self, dim):
        return torch.randn(dim)

    def make(self, raw):
        return HouseholderTransform(raw)


class SylvesterFlow(_ElementwiseParamFlow):
    """Sylvester normalizing flow (van den Berg et al. 2018): :class:`nfvi.transforms.SylvesterTransform` layers.

    Raw parameters per layer, in the authors' layout (``models/VAE.py`` of their code): one ``M x M`` matrix whose
    strict upper triangle is ``R``'s and whose strict lower triangle, transposed, is ``R~``'s; the two diagonals
    (``M`` each), passed through ``tanh`` so that ``R_ii R~_ii`` is in (-1, 1) (every layer invertible); ``b`` (M);
    then ``Q``'s parameters by ``variant``:

    - ``orthogonal`` (O-SNF): a ``D x M`` matrix, ``M = num_vectors <= D`` (default D), orthonormalised by
      :func:`nfvi.transforms.bjorck_orthonormalize` (a fixed number of steps);
    - ``householder`` (H-SNF): ``num_householder`` vectors (default 4), ``Q = H_1 ... H_H`` (``M = D``);
    - ``triangular`` (T-SNF): none; ``Q`` is the identity on even layers and the reversal on odd ones (``M = D``).

    So ``P = M^2 + 3M`` (+ ``D M`` or ``H D``) per layer, as theirs: the matrix's M diagonal entries are not read
    (the authors' head computes them too and overwrites them with the separate diagonals). Amortized: one
    ``Linear(context_dim, K * P)`` head computes all of them per data point, as the authors compute them from the
    encoder's last features (z=64, K=4, 256 features: O-SNF M=8 616,800 parameters, H-SNF 8 reflections 4,934,400,
    T-SNF 4,408,064). No inverse: use the sampling path (Eq. 7).
    """

    def __init__(
        self,
        dim: int,
        length: int,
        context_dim: int = 0,
        variant: str = "orthogonal",
        num_vectors: int | None = None,
        num_householder: int | None = None,
    ):
        check_choice("flow.variant", variant, SYLVESTER_VARIANTS)
        if num_vectors is not None and variant != "orthogonal":
            raise NfviError(f"flow.num_vectors={num_vectors!r} is not allowed with variant={variant!r}; M = D there")
        if num_householder is not None and variant != "householder":
            raise NfviError(f"flow.num_householder={num_householder!r} is not allowed with variant={variant!r}")
        self.variant = variant
        self.num_vectors = dim if num_vectors is None else num_vectors
        _check_int("flow.num_vectors", self.num_vectors, 1, dim)
        self.num_householder = 4 if num_householder is None else num_householder
        _check_int("flow.num_householder", self.num_householder, 1)
        super().__init__(dim, length, context_dim)
        self.register_buffer("reverse", torch.eye(dim).flip(1))

    def init_raw(self, dim):
        m = self.num_vectors
        q = {
            "orthogonal": torch.eye(dim, m) + 0.1 * torch.randn(dim, m),
            "householder": torch.randn(self.num_householder, dim),
            "triangular": torch.zeros(0),
        }[self.variant]
        return torch.cat([torch.randn(m * m) * 0.1, torch.randn(2 * m) * 0.1, torch.zeros(m), q.flatten()])

    def make_layer(self, raw: Tensor, k: int) -> SylvesterTransform:
        d, m = self.dim, self.num_vectors
        full = raw[..., : m * m].unflatten(-1, (m, m))  # strict upper: R's; strict lower, transposed: R~'s
        diag, diag_tilde = raw[..., m * m : m * m + 2 * m].unflatten(-1, (2, m)).unbind(-2)
        b = raw[..., m * m + 2 * m : m * m + 3 * m]
        q_raw = raw[..., m * m + 3 * m :]
        if self.variant == "orthogonal":
            q = bjorck_orthonormalize(q_raw.unflatten(-1, (d, m)))
        elif self.variant == "householder":
            hs = householder_matrix(q_raw.unflatten(-1, (self.num_householder, d))).unbind(-3)
            q = hs[0]
            for h in hs[1:]:
                q = q @ h
        else:
            eye = torch.eye(d, dtype=raw.dtype, device=raw.device)
            q = eye if k % 2 == 0 else self.reverse.to(raw.dtype)
        r = torch.triu(full, 1) + torch.diag_embed(torch.tanh(diag))
        r_tilde = torch.triu(full.transpose(-1, -2), 1) + torch.diag_embed(torch.tanh(diag_tilde))
        return SylvesterTransform(q, r, r_tilde, b, log1p_tanh_product(diag, diag_tilde))

    def transforms(self, context=None):
        raw = self.raw_params(context)
        return [self.make_layer(raw[..., k, :], k) for k in range(self.length)]

    def inverse_with_overflow(self, z_k: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("sylvester flows have no inverse; use rsample_and_log_prob")


def _check_options(kind: str, options: dict) -> None:
    """The option checks of the CLI (:class:`nfvi.config.FlowConfig`) that the layers do not make themselves:
    ``w_floor`` finite in [0, 100] (or None/"auto"), NICE's ``hidden`` >= 1, and the upper bounds of the widths."""
    w_floor = options.get("w_floor", "auto")
    if not (w_floor is None or (isinstance(w_floor, str) and w_floor == "auto")):
        check_range("flow.w_floor", w_floor, 0.0, 100.0, kind='a floor on ||w|| (None: off, "auto": 0.1 if amortized)')
    if kind == "nice" and "hidden" in options:
        check_int_range("flow.hidden", options["hidden"], 1, MAX_WIDTH, kind="a layer width")
    bounds = {"hidden": MAX_WIDTH, "num_hidden": 16, "num_householder": MAX_WIDTH, "num_vectors": MAX_WIDTH}
    for key, high in bounds.items():  # lower bounds: the layers' own messages
        value = options.get(key)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > high:
            check_int_range(f"flow.{key}", value, 1, high, kind="a whole number")


def build_flow(kind: str, dim: int, length: int, context_dim: int = 0, **options) -> Flow:
    """Build a flow of ``length`` layers of ``kind`` on R^dim.

    Args:
        kind: one of ``FLOW_KINDS``: ``planar``, ``radial``, ``nice``, ``iaf``, ``householder``, ``sylvester``;
            ``none`` (or length 0) is the identity.
        dim: event dimension D >= 1.
        length: number of layers K >= 0.
        context_dim: 0 for global parameters; > 0 to compute them from a context vector (amortized).
        options: kind-specific (``FLOW_OPTIONS``): ``w_floor`` (planar); ``hidden`` and ``mix`` (nice);
            ``hidden`` (MADE width, default 64) and ``num_hidden`` (MADE hidden layers, default 1) (iaf);
            ``variant`` (``orthogonal`` | ``householder`` | ``triangular``), ``num_vectors`` (orthogonal: M <= D,
            default D) and ``num_householder`` (householder: reflections in Q, default 4) (sylvester).
    """
    check_choice("flow", kind, FLOW_KINDS)
    # the CLI's bounds (nfvi.config.FlowConfig), so that build_flow("planar", 2, 10**9) is refused before it allocates
    check_int_range("flow.length", length, 0, MAX_FLOW_LENGTH, kind="a whole number of layers")
    _check_int("flow.dim", dim, 1)
    _check_int("flow.context_dim", context_dim, 0)
    for name in options:
        if name not in FLOW_OPTIONS[kind]:
            allowed = ", ".join(FLOW_OPTIONS[kind]) or "none"
            raise NfviError(f"flow option {name!r} is not allowed for flow={kind!r}; options: {allowed}")
    _check_options(kind, options)
    if kind == "none" or length == 0:
        return IdentityFlow(dim)
    cls = {
        "planar": PlanarFlow,
        "radial": RadialFlow,
        "nice": NICEFlow,
        "iaf": IAFFlow,
        "householder": HouseholderFlow,
        "sylvester": SylvesterFlow,
    }[kind]
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
