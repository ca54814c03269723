"""The Table 1 energies at hand-computed points, and quadrature of log Z and KL on a box."""

from __future__ import annotations

import math

import pytest
import torch

from nfvi.energies import ENERGIES, confine, grid_points, kl_on_grid, log_normalizer

# Hand-computed values (paper Table 1):
#   U1(2, 0): ring 0, modes e^0 + e^{-(4/0.6)^2/2} -> -log(1 + e^{-22.22})
#   U1(0, 0): ring (2/0.4)^2/2 = 12.5, modes 2 e^{-(2/0.6)^2/2} -> 12.5 - log 2 + 50/9
#   U1(0, 2): ring 0, same modes -> -log 2 + 50/9
#   U2(1, 1): w1 = sin(pi/2) = 1 -> 0;  U2(0, 0.4) = (0.4/0.4)^2/2;  U2(3, 0): w1 = -1 -> (1/0.4)^2/2
#   U3(1, -2): a = z2 - w1 = -3, w2(1) = 3 -> modes e^{-(3/0.35)^2/2} + e^0
#   U3(0, 0): a = 0, w2(0) = 3 e^{-(1/0.6)^2/2} -> -log(1 + e^{-(w2/0.35)^2/2})
#   U4(1, 1): a = 0, w3(1) = 3 sigma(0) = 1.5 -> -log(1 + e^{-(1.5/0.35)^2/2})
#   U4(5, -3): w1 = sin(5 pi/2) = 1, a = -4, w3 ~ 3 -> -log(e^{-(4/0.4)^2/2} + e^{-(1/0.35)^2/2})
W2_0 = 3 * math.exp(-0.5 * (1 / 0.6) ** 2)
W3_5 = 3 / (1 + math.exp(-4 / 0.3))
HAND = [
    ("U1", (2.0, 0.0), -math.log1p(math.exp(-0.5 * (4 / 0.6) ** 2))),
    ("U1", (0.0, 0.0), 12.5 - math.log(2) + 50 / 9),
    ("U1", (0.0, 2.0), -math.log(2) + 50 / 9),
    ("U1", (0.0, -2.0), -math.log(2) + 50 / 9),
    ("U2", (1.0, 1.0), 0.0),
    ("U2", (0.0, 0.4), 0.5),
    ("U2", (3.0, 0.0), 3.125),
    ("U3", (1.0, -2.0), -math.log1p(math.exp(-0.5 * (3 / 0.35) ** 2))),
    ("U3", (0.0, 0.0), -math.log1p(math.exp(-0.5 * (W2_0 / 0.35) ** 2))),
    ("U4", (1.0, 1.0), -math.log1p(math.exp(-0.5 * (1.5 / 0.35) ** 2))),
    ("U4", (5.0, -3.0), -math.log(math.exp(-0.5 * (4 / 0.4) ** 2) + math.exp(-0.5 * ((-4 + W3_5) / 0.35) ** 2))),
]


@pytest.mark.parametrize("name, z, expected", HAND, ids=[f"{n}{z}" for n, z, _ in HAND])
def test_energies_match_table1_at_hand_computed_points(name, z, expected):
    value = ENERGIES[name](torch.tensor(z, dtype=torch.float64))
    assert value.shape == ()
    assert float(value) == pytest.approx(expected, abs=1e-9)


def test_energies_are_the_four_of_table1():
    assert list(ENERGIES) == ["U1", "U2", "U3", "U4"]


@pytest.mark.parametrize("name", ["U1", "U2", "U3", "U4"])
def test_energies_broadcast_and_stay_finite_far_out(name):
    z = torch.randn(3, 5, 2) * 3
    assert ENERGIES[name](z).shape == (3, 5)
    # logsumexp: far from both modes a naive log(exp(a) + exp(b)) underflows to log(0) in float32
    far = torch.tensor([[20.0, 0.0], [0.0, -30.0], [-25.0, 25.0]])
    assert torch.isfinite(ENERGIES[name](far)).all()


@pytest.mark.parametrize(
    "energy, box, expected",
    [
        (lambda z: (z * z).sum(-1) / (2 * 0.5**2), 4.0, math.log(2 * math.pi * 0.25)),  # normalised Gaussian, s = 0.5
        (lambda z: (z * z).sum(-1) / 2 + 1.0, 6.0, math.log(2 * math.pi) - 1.0),  # shifted by a constant
        (lambda z: torch.zeros(z.shape[:-1], dtype=z.dtype), 3.0, math.log(36.0)),  # the box's area
        (ENERGIES["U2"], 4.0, math.log(8 * math.sqrt(2 * math.pi) * 0.4)),  # 8 wide in z1, a Gaussian in z2
    ],
    ids=["gaussian", "gaussian+1", "flat", "U2"],
)
def test_log_normalizer_on_the_box(energy, box, expected):
    assert log_normalizer(energy, box=box, grid=400) == pytest.approx(expected, abs=1e-6)


def test_grid_points_layout():
    centres, z, area = grid_points(box=2.0, grid=4)
    assert torch.allclose(centres, torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64))
    assert z.shape == (4, 4, 2) and area == 1.0
    assert z[0, 3].tolist() == [1.5, -1.5]  # row = z2, column = z1


@pytest.mark.parametrize("var_q, var_p", [(1.0, 1.0), (1.0, 4.0), (0.5, 1.5)])
def test_kl_on_grid_matches_gaussian_kl(var_q, var_p):
    _, z, area = grid_points(box=10.0, grid=400)
    r2 = (z * z).sum(-1)
    log_q = -r2 / (2 * var_q) - math.log(2 * math.pi * var_q)
    kl, mass = kl_on_grid(log_q, r2 / (2 * var_p), area)
    exact = 2 * 0.5 * (var_q / var_p - 1 + math.log(var_p / var_q))
    assert kl == pytest.approx(exact, abs=1e-5)
    assert mass == pytest.approx(1.0, abs=1e-6)


def test_kl_on_grid_renormalises_q_on_the_box():
    _, z, area = grid_points(box=4.0, grid=200)
    u = ENERGIES["U1"](z)
    kl, mass = kl_on_grid(-u + math.log(0.3), u, area)  # q = 0.3 p_box * Z: same shape, any mass
    assert kl == pytest.approx(0.0, abs=1e-9)
    assert mass == pytest.approx(0.3 * math.exp(log_normalizer(ENERGIES["U1"], 4.0, 200)), rel=1e-9)


@pytest.mark.parametrize("name", ["U1", "U2", "U3", "U4"])
def test_confine_leaves_u_on_the_box_and_raises_it_outside(name):
    u = ENERGIES[name]
    confined = confine(u, box=4.0, wall=0.1)
    inside = (torch.rand(100, 2, dtype=torch.float64) * 2 - 1) * 4.0
    assert torch.equal(confined(inside), u(inside))
    outside = torch.tensor([[4.2, 0.0], [0.0, -4.3], [-5.0, 5.0]], dtype=torch.float64)
    extra = torch.tensor([0.2**2, 0.3**2, 2.0]) / (2 * 0.01)
    assert torch.allclose(confined(outside) - u(outside), extra.double())
    assert confine(u, 4.0, 0.0) is u


def test_confine_makes_a_flat_energy_proper_with_the_stated_normaliser():
    flat = lambda z: torch.zeros(z.shape[:-1], dtype=z.dtype)
    wall = 0.25
    expected = 2 * math.log(2 * 3.0 + 2 * wall * math.sqrt(math.pi / 2))  # (box width + two half-Gaussians)^2
    assert log_normalizer(confine(flat, 3.0, wall), box=3.0 + 10 * wall, grid=1100) == pytest.approx(expected, abs=1e-5)
