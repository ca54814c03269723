"""The 2-D target energies of the paper's Table 1 and quadrature on a bounded box.

``p(z) = exp(-U(z)) / Z`` with ``z = (z1, z2)``. Every ``U`` takes ``z`` of shape ``(..., 2)`` and
returns ``(...)``. The two-mode energies U1, U3 and U4 are written with ``torch.logsumexp``.

U2, U3 and U4 are flat in ``z1`` apart from bounded warps, so ``exp(-U)`` is **not normalisable on
R^2**. Everything normalised here is therefore normalised **on a box** ``[-a, a]^2`` (``a = box``,
default 4, the plotting range of the public reproductions): ``Z_box = int_box exp(-U) dz`` and
``p_box = exp(-U) / Z_box`` restricted to the box. For U1 the box holds all but ~e^-12 of the mass,
so ``Z_box`` is ``Z``.

Because of that, fitting the raw U2-U4 rewards a q that spreads without end along z1 (the entropy
grows like the log of its width while E[U] stays flat). :func:`confine` adds an optional soft wall
at the box edge that leaves U unchanged inside the box and makes exp(-U) proper.

Quadrature is the midpoint rule on a ``grid x grid`` lattice of cell centres (cell side
``2a / grid``), computed in float64 with logsumexp.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "ENERGIES",
    "DEFAULT_BOX",
    "u1",
    "u2",
    "u3",
    "u4",
    "confine",
    "grid_points",
    "log_normalizer",
    "kl_on_grid",
]

DEFAULT_BOX = 4.0


def _w1(z: Tensor) -> Tensor:
    return torch.sin(2 * math.pi * z[..., 0] / 4)


def _w2(z: Tensor) -> Tensor:
    return 3 * torch.exp(-0.5 * ((z[..., 0] - 1) / 0.6) ** 2)


def _w3(z: Tensor) -> Tensor:
    return 3 * torch.sigmoid((z[..., 0] - 1) / 0.3)


def u1(z: Tensor) -> Tensor:
    """Ring with two modes: ``1/2 ((||z|| - 2)/0.4)^2 - ln(e^{-1/2((z1-2)/0.6)^2} + e^{-1/2((z1+2)/0.6)^2})``."""
    ring = 0.5 * ((torch.linalg.vector_norm(z, dim=-1) - 2) / 0.4) ** 2
    modes = torch.stack([-0.5 * ((z[..., 0] - 2) / 0.6) ** 2, -0.5 * ((z[..., 0] + 2) / 0.6) ** 2], dim=-1)
    return ring - torch.logsumexp(modes, dim=-1)


def u2(z: Tensor) -> Tensor:
    """Sine wave: ``1/2 ((z2 - w1(z)) / 0.4)^2`` with ``w1(z) = sin(2 pi z1 / 4)``."""
    return 0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2


def u3(z: Tensor) -> Tensor:
    """Split sine: ``-ln(e^{-1/2((z2-w1)/0.35)^2} + e^{-1/2((z2-w1+w2)/0.35)^2})``.

    ``w2(z) = 3 exp(-1/2 ((z1 - 1)/0.6)^2)``.
    """
    a = z[..., 1] - _w1(z)
    modes = torch.stack([-0.5 * (a / 0.35) ** 2, -0.5 * ((a + _w2(z)) / 0.35) ** 2], dim=-1)
    return -torch.logsumexp(modes, dim=-1)


def u4(z: Tensor) -> Tensor:
    """Sine with a step: ``-ln(e^{-1/2((z2-w1)/0.4)^2} + e^{-1/2((z2-w1+w3)/0.35)^2})``.

    ``w3(z) = 3 sigma((z1 - 1)/0.3)`` with the logistic sigma.
    """
    a = z[..., 1] - _w1(z)
    modes = torch.stack([-0.5 * (a / 0.4) ** 2, -0.5 * ((a + _w3(z)) / 0.35) ** 2], dim=-1)
    return -torch.logsumexp(modes, dim=-1)


#: Table 1 of the paper: name -> U(z), z of shape (..., 2).
ENERGIES: dict[str, Callable[[Tensor], Tensor]] = {"U1": u1, "U2": u2, "U3": u3, "U4": u4}


def confine(energy: Callable[[Tensor], Tensor], box: float, wall: float) -> Callable[[Tensor], Tensor]:
    """``U_c(z) = U(z) + sum_i relu(|z_i| - box)^2 / (2 wall^2)``; ``energy`` itself when ``wall <= 0``.

    ``U_c = U`` on ``[-box, box]^2``; outside, exp(-U_c) falls off like a half-Gaussian of width
    ``wall``, so the target is normalisable and ``p_c`` restricted to the box is ``p_box``.
    """
    if wall <= 0:
        return energy

    def confined(z: Tensor) -> Tensor:
        excess = torch.relu(z.abs() - box)
        return energy(z) + (excess * excess).sum(-1) / (2 * wall * wall)

    confined.__name__ = f"{getattr(energy, '__name__', 'U')}_confined"
    return confined


def grid_points(box: float = DEFAULT_BOX, grid: int = 400, dtype=torch.float64) -> tuple[Tensor, Tensor, float]:
    """Cell centres of a ``grid x grid`` lattice on ``[-box, box]^2``.

    Returns ``(centres, z, cell_area)``: ``centres`` of shape ``(grid,)``, ``z`` of shape
    ``(grid, grid, 2)`` with ``z[i, j] = (centres[j], centres[i])`` (row index = z2, as in an image
    with ``origin="lower"``), and the area of one cell.
    """
    step = 2 * box / grid
    centres = -box + step * (torch.arange(grid, dtype=dtype) + 0.5)
    z2, z1 = torch.meshgrid(centres, centres, indexing="ij")
    return centres, torch.stack([z1, z2], dim=-1), step * step


def log_normalizer(energy: Callable[[Tensor], Tensor], box: float = DEFAULT_BOX, grid: int = 400) -> float:
    """``log Z_box = log int_{[-box, box]^2} exp(-U(z)) dz`` by the midpoint rule (nats)."""
    _, z, area = grid_points(box, grid)
    return float(torch.logsumexp(-energy(z).flatten(), dim=0) + math.log(area))


def kl_on_grid(log_q: Tensor, energy_values: Tensor, cell_area: float) -> tuple[float, float]:
    """``KL(q_box || p_box)`` by quadrature, from ``log q`` and ``U`` at the cell centres of a box.

    Both densities are renormalised on the box: ``q_box = q / Q_box`` with ``Q_box = sum q dA``
    (the mass of ``q`` inside the box) and ``p_box = exp(-U) / Z_box``. Returns ``(kl, Q_box)``:
    the KL in nats and the mass of ``q`` in the box (``1 - Q_box`` lies outside and is not compared).

    Args:
        log_q: ``(G, G)`` log-density of q at the cell centres (e.g. exact, through the flow's inverse).
        energy_values: ``(G, G)`` values of ``U`` at the same points.
        cell_area: area of one cell.
    """
    log_q = log_q.double().flatten()
    log_p = -energy_values.double().flatten()
    log_q_mass = torch.logsumexp(log_q, 0) + math.log(cell_area)
    log_z = torch.logsumexp(log_p, 0) + math.log(cell_area)
    log_qb, log_pb = log_q - log_q_mass, log_p - log_z
    q_cell = torch.exp(log_qb) * cell_area
    kl = torch.sum(torch.where(q_cell > 0, q_cell * (log_qb - log_pb), torch.zeros_like(q_cell)))
    return float(kl), float(torch.exp(log_q_mass))
