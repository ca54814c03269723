"""``dataset=fake``: small generated 28x28 grey-level images (seeded, no files) for tests and CI.

Ten classes of pen-like strokes (ring, bars, diagonals, plus, cross, L, T, blob), each drawn with a
random rotation, scale, shift and stroke width, so a VAE has real structure to learn. Pixels are
Bernoulli means in [0, 1] (about 0.1 on average, like MNIST).
"""

from __future__ import annotations

import math

import torch

__all__ = ["fake_images", "NUM_CLASSES"]

SIDE = 28
NUM_CLASSES = 10
_RING = [
    (
        0.6 * math.cos(2 * math.pi * k / 8),
        0.6 * math.sin(2 * math.pi * k / 8),
        0.6 * math.cos(2 * math.pi * (k + 1) / 8),
        0.6 * math.sin(2 * math.pi * (k + 1) / 8),
    )
    for k in range(8)
]
#: class -> segments (x0, y0, x1, y1) in [-1, 1]^2 (y down); a zero-length segment is a blob
_TEMPLATES = [
    _RING,
    [(0.0, -0.7, 0.0, 0.7)],  # vertical bar
    [(-0.7, 0.0, 0.7, 0.0)],  # horizontal bar
    [(-0.5, 0.6, 0.5, -0.6)],  # /
    [(-0.5, -0.6, 0.5, 0.6)],  # \
    [(0.0, -0.6, 0.0, 0.6), (-0.6, 0.0, 0.6, 0.0)],  # +
    [(-0.5, -0.5, 0.5, 0.5), (-0.5, 0.5, 0.5, -0.5)],  # x
    [(-0.4, -0.7, -0.4, 0.6), (-0.4, 0.6, 0.5, 0.6)],  # L
    [(-0.6, -0.6, 0.6, -0.6), (0.0, -0.6, 0.0, 0.7)],  # T
    [(0.0, 0.0, 0.0, 0.0)],  # blob
]


def fake_images(n: int, generator: torch.Generator, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 784)`` float32 in [0, 1] and their classes ``(n,)`` int64, drawn from ``generator``."""
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    angle = (torch.rand(n, generator=generator) - 0.5) * 0.6
    scale = 0.75 + 0.35 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.3
    width = 0.07 + 0.06 * torch.rand(n, generator=generator)
    width = torch.where(labels == 9, width * 3.5, width)  # the blob is wide

    ticks = (torch.arange(SIDE, dtype=torch.float32) + 0.5) * (2.0 / SIDE) - 1.0
    px, py = ticks.repeat(SIDE), ticks.repeat_interleave(SIDE)  # pixel centres, row-major (y down)
    out = torch.empty(n, SIDE * SIDE)
    for c, template in enumerate(_TEMPLATES):
        for idx in (labels == c).nonzero().squeeze(1).split(chunk):
            seg = torch.tensor(template).expand(len(idx), -1, -1)  # (m, S, 4)
            cos, sin = torch.cos(angle[idx])[:, None], torch.sin(angle[idx])[:, None]
            s, (sx, sy) = scale[idx, None], shift[idx].T[..., None]
            ends = []
            for x, y in ((seg[..., 0], seg[..., 1]), (seg[..., 2], seg[..., 3])):
                ends += [(cos * x - sin * y) * s + sx, (sin * x + cos * y) * s + sy]
            ax, ay, bx, by = (e[..., None] for e in ends)  # (m, S, 1)
            dx, dy = bx - ax, by - ay
            rx, ry = px - ax, py - ay  # (m, S, 784)
            t = ((rx * dx).add_(ry * dy)).div_(dx * dx + dy * dy + 1e-12).clamp_(0.0, 1.0)
            dist2 = (rx - t * dx).square_().add_((ry - t * dy).square_()).amin(1)  # (m, 784)
            out[idx] = torch.exp(dist2.div_(width[idx, None].square().mul(-2.0)))
    return out, labels
