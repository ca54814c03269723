"""Amortized NICE (Table 2's baseline, K=80): nfvi's :class:`nfvi.flows.NICEFlow` against the straightforward code.

The reference runs the *same* coupling nets (shared parameters) the way the flow is usually written: each
layer's MLP reads ``cat([z_a, h])``, with ``h`` expanded to every sample, and the shifted half is written by
index assignment into a clone. nfvi computes the context part of every layer's first product, ``W_c h``, in one
matrix product per data point and runs the chain as one autograd node (:func:`nfvi.transforms.coupling_chain`).
Two rows: one
training pass (forward and backward, batch 100, one sample) and an importance-sampling pass (forward only,
``S`` samples per image, no gradients), as ``nfvi evaluate`` runs the flow.

    python -m benchmarks.run --only nice
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nfvi.flows import NICEFlow

Z, H, HIDDEN = 40, 400, 64  # latent, encoder features (the maxout model's 400), coupling-net width


class RefNICE(nn.Module):
    """Reference forward of ``flow``'s couplings (shares its parameters): ``cat([z_a, h])`` and index assignment."""

    def __init__(self, flow: NICEFlow):
        super().__init__()
        self.flow = flow

    def forward(self, z: Tensor, h: Tensor) -> Tensor:
        for k, coupling in enumerate(self.flow.nets):
            keep, change = getattr(self.flow, f"keep_{k}"), getattr(self.flow, f"change_{k}")
            inp = torch.cat([z[..., keep], h.expand(*z.shape[:-1], h.shape[-1])], dim=-1)
            z_new = z.clone()
            z_new[..., change] = z[..., change] + coupling.net(inp)
            z = z_new
        return z


def _flow(length: int, seed: int = 0) -> NICEFlow:
    torch.manual_seed(seed)
    flow = NICEFlow(Z, length, context_dim=H, hidden=HIDDEN)
    for coupling in flow.nets:  # a trained-looking flow: the last layers start at zero (the identity)
        nn.init.normal_(coupling.net[-1].weight, std=0.01)
    return flow


def make_steps(length: int, batch: int, samples: int, train: bool):
    """``{"nfvi": step, "ref": step}``: one pass of each through the same K-layer flow on ``(samples, batch)``."""
    flow = _flow(length)
    ref = RefNICE(flow)
    z = torch.randn(samples, batch, Z)
    h = torch.randn(batch, H, requires_grad=train)

    def nfvi_step():
        with torch.set_grad_enabled(train):
            z_k, _ = flow(z, h)
            if train:
                z_k.square().sum().backward()

    def ref_step():
        with torch.set_grad_enabled(train):
            z_k = ref(z, h)
            if train:
                z_k.square().sum().backward()

    return {"nfvi": nfvi_step, "ref": ref_step}


def bench_nice(length: int, repeats: int, number: int, batch: int = 100, is_images: int = 10, num_samples: int = 200):
    """Rows of the ``nice`` table (passes per second and the speedup over :class:`RefNICE`)."""
    from benchmarks.run import interleaved

    rows = []
    cases = [
        (f"NICE K={length} train pass (fwd+bwd), batch {batch}, S=1", batch, 1, True),
        (
            f"NICE K={length} IS pass (fwd, no grad), {is_images} images x S={num_samples}",
            is_images,
            num_samples,
            False,
        ),
    ]
    for name, b, s, train in cases:
        sec = interleaved(make_steps(length, b, s, train), repeats, number)
        rows.append(
            {
                "bench": name,
                "nfvi_per_s": 1 / sec["nfvi"],
                "ref_per_s": 1 / sec["ref"],
                "speedup_vs_ref": sec["ref"] / sec["nfvi"],
            }
        )
    return rows
