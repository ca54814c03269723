"""Conditional densities p(y | x) whose parameters an MLP computes from x.

:class:`FlowCDE` (``model=flow``; with no flow layers, ``model=gaussian``) maps an observed y to
z in the **normalizing direction**, so its density is exact and needs no inverse::

    h = MLP(x)                                   # (*batch, H)
    z_0 = (y - m(h)) / s(h),  s = min_scale + softplus(.) > 0    # affine base layer
    z_K, ladj = flow(z_0, context=h)             # K planar / radial / NICE layers, amortized
    log p(y | x) = log N(z_K; 0, I) - sum log s + ladj

(``ladj = sum_k log|det dz_k/dz_{k-1}|``, :func:`nfvi.flows.build_flow`.) Planar layers whose w
comes from h carry the w-floor guard of :class:`nfvi.flows.PlanarFlow` (docs/paper.md section 13).

:class:`MixtureDensityNetwork` (``model=mdn``) is the classic baseline: C diagonal Gaussians with
weights, means and scales from h.

Shapes: ``x`` is ``(*batch, D_x)``; ``y`` is ``(*sample, *batch, D_y)`` (extra leading dims, e.g.
a grid of y values per x, broadcast); ``log_prob`` returns ``(*sample, *batch)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfvi.errors import NfviError, check_choice, check_range
from nfvi.flows import Flow, build_flow
from nfvi.training import flow_from_config

__all__ = ["MODELS", "ACTIVATIONS", "ContextNet", "FlowCDE", "MixtureDensityNetwork", "build_model", "model_label"]

MODELS = ("flow", "gaussian", "mdn")
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}
LOG_2PI = math.log(2 * math.pi)


def std_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over the last dim: ``(*, D) -> (*)``."""
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


class ContextNet(nn.Module):
    """MLP ``x (*, D_x) -> h (*, H)`` with the activation after every layer; ``hidden=()`` is ``h = x``."""

    def __init__(self, x_dim: int, hidden: Sequence[int], activation: str = "tanh"):
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        layers, width = [], x_dim
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        self.net = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _inv_softplus(v: float) -> float:
    return math.log(math.expm1(v))


class FlowCDE(nn.Module):
    """Affine base + amortized flow in the normalizing direction y -> z (module docstring).

    Args:
        x_dim, y_dim: dimensions of x and y.
        flow: a :class:`nfvi.flows.Flow` on R^{y_dim} with ``context_dim == context.out_dim`` (or the
            identity, which makes this the conditional Gaussian baseline).
        context: the MLP computing h from x.
        min_scale: lower bound of s(x), in the units of y fed to the model (standardised).
    """

    def __init__(self, x_dim: int, y_dim: int, flow: Flow, context: ContextNet, min_scale: float = 1e-3):
        super().__init__()
        self.x_dim, self.y_dim, self.min_scale = x_dim, y_dim, min_scale
        self.context = context
        self.affine = nn.Linear(context.out_dim, 2 * y_dim)
        with torch.no_grad():  # start at m = 0, s = 1: the identity on standardised data
            self.affine.weight.zero_()
            self.affine.bias.zero_()
            self.affine.bias[y_dim:] = _inv_softplus(1.0 - min_scale)
        self.flow = flow

    def normalize(self, y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``z_K`` ``(*sample, *batch, D_y)`` and ``log|det dz_K/dy|`` ``(*sample, *batch)``."""
        h = self.context(x)
        m, s_raw = self.affine(h).chunk(2, dim=-1)
        s = self.min_scale + F.softplus(s_raw)
        z = (y - m) / s
        z, ladj = self.flow(z, context=h if self.flow_is_amortized else None)
        return z, ladj - torch.log(s).sum(-1)

    def autocast_modules(self) -> list[nn.Module]:
        """The networks that ``precision=bf16`` runs under autocast: the context MLP, the affine head and an
        amortized flow's parameter head (:mod:`nfvi.precision`); the flow's layers and log-densities stay float32."""
        head = getattr(self.flow, "head", None)
        return [self.context, self.affine, *([head] if isinstance(head, nn.Module) else [])]

    @property
    def flow_is_amortized(self) -> bool:
        return getattr(self.flow, "context_dim", 0) > 0

    def log_prob(self, y: Tensor, x: Tensor) -> Tensor:
        """``log p(y | x)``, exact: ``(*sample, *batch)``."""
        z, ladj = self.normalize(y, x)
        return std_normal_log_prob(z) + ladj


class MixtureDensityNetwork(nn.Module):
    """``p(y|x) = sum_c pi_c(x) N(y; mu_c(x), diag sigma_c(x)^2)`` with C components (Bishop 1994)."""

    def __init__(self, x_dim: int, y_dim: int, components: int, context: ContextNet, min_scale: float = 1e-3):
        super().__init__()
        check_range("mdn_components", components, low=1, kind="a number of mixture components")
        self.x_dim, self.y_dim, self.components, self.min_scale = x_dim, y_dim, components, min_scale
        self.context = context
        self.head = nn.Linear(context.out_dim, components * (1 + 2 * y_dim))
        with torch.no_grad():  # spread the initial means so the components do not start identical
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
            c, d = components, y_dim
            self.head.bias[c : c + c * d] = torch.linspace(-1.0, 1.0, c).repeat_interleave(d) if c > 1 else 0.0
            self.head.bias[c + c * d :] = _inv_softplus(0.5)

    def autocast_modules(self) -> list[nn.Module]:
        """The networks that ``precision=bf16`` runs under autocast: the context MLP and the mixture head."""
        return [self.context, self.head]

    def log_prob(self, y: Tensor, x: Tensor) -> Tensor:
        """``log p(y | x)``: ``(*sample, *batch)``."""
        c, d = self.components, self.y_dim
        out = self.head(self.context(x))
        logits, mu, s_raw = out.split([c, c * d, c * d], dim=-1)
        mu = mu.unflatten(-1, (c, d))
        sigma = self.min_scale + F.softplus(s_raw.unflatten(-1, (c, d)))  # (*batch, C, D)
        z = (y.unsqueeze(-2) - mu) / sigma  # (*sample, *batch, C, D)
        log_comp = std_normal_log_prob(z) - torch.log(sigma).sum(-1)
        return torch.logsumexp(F.log_softmax(logits, dim=-1) + log_comp, dim=-1)


def build_model(
    model: str,
    x_dim: int,
    y_dim: int,
    flow_cfg=None,
    hidden: Sequence[int] = (64, 64),
    activation: str = "tanh",
    mdn_components: int = 5,
    min_scale: float = 1e-3,
) -> nn.Module:
    """The ``model=flow|gaussian|mdn`` density, with ``flow_cfg`` (a ``FlowConfig``) for ``flow``."""
    check_choice("model", model, MODELS)
    check_range("min_scale", min_scale, low=0.0, kind="a non-negative scale floor")
    context = ContextNet(x_dim, hidden, activation)
    if model == "mdn":
        return MixtureDensityNetwork(x_dim, y_dim, mdn_components, context, min_scale)
    if model == "gaussian" or flow_cfg is None:
        flow = build_flow("none", y_dim, 0)
    else:
        if flow_cfg.kind == "nice" and y_dim < 2:
            raise NfviError(f"flow=nice needs y of dimension >= 2, this dataset's y has {y_dim}; use planar or radial")
        flow = flow_from_config(flow_cfg, y_dim, context_dim=context.out_dim)
    return FlowCDE(x_dim, y_dim, flow, context, min_scale)


def model_label(model: str, flow_kind: str = "none", flow_length: int = 0, mdn_components: int = 5) -> str:
    """Short row label for tables: ``gaussian``, ``mdn (C=5)``, ``radial (K=4)``."""
    if model == "mdn":
        return f"mdn (C={mdn_components})"
    if model == "gaussian" or flow_kind == "none" or flow_length == 0:
        return "gaussian"
    return f"{flow_kind} (K={flow_length})"
