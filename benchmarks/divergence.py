"""How far the update with nfvi's compiled CPU kernels drifts from the same update in torch operations, against how
far torch's own update drifts when its starting weights move by one part in 10^7.

    python -m benchmarks.divergence                       # Table 2's model (planar K=80), the paper's RMSprop
    python -m benchmarks.divergence --steps 50 --k 10

The kernels give each update's numbers to float32 rounding (tests/test_kernels.py). The paper's protocol (RMSprop
at lr 1e-5, momentum 0.9, eps 1e-8, from zero second moments, Eq. 20 annealing) amplifies any such difference:
this measures by how much, so that two runs' different trajectories can be told from a wrong gradient. Same model
(``build_model``), seeds and batches for all three runs; batches are binarized MNIST training images from
``$NFVI_DATA/mnist.npz`` when there, else random binary images (the output says which). One torch thread.

Prints the relative parameter difference ``|theta_a - theta_b| / |theta_a|`` after each listed update and writes
``benchmarks/results/divergence.csv``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from benchmarks.run import kernels_on
from nfvi.config import FlowConfig, OptimConfig
from nfvi.runs import retain_freed_memory
from nfvi.training import optimizer_from_config, step_with_norm
from nfvi.vae.model import ModelConfig, build_model
from nfvi.vae.objectives import annealed_loss, beta_schedule, free_energy_terms

RESULTS = Path(__file__).parent / "results"
X_DIM, BATCH = 784, 100


def batches(steps: int, seed: int = 0) -> tuple[list[torch.Tensor], str]:
    """``steps`` binarized batches of 100 images: MNIST's training images where ``$NFVI_DATA`` has them."""
    gen = torch.Generator().manual_seed(seed)
    path = Path(os.environ.get("NFVI_DATA", "")) / "mnist.npz"
    if os.environ.get("NFVI_DATA") and path.is_file():
        with np.load(path) as data:
            images = torch.tensor(data["x_train"][: steps * BATCH].reshape(-1, X_DIM) / 255.0, dtype=torch.float32)
        source = f"MNIST training images ({path.name}), binarized"
    else:
        images = torch.full((steps * BATCH, X_DIM), 0.3)
        source = "random binary images (no $NFVI_DATA/mnist.npz)"
    probs = images.repeat((steps * BATCH + len(images) - 1) // len(images), 1)[: steps * BATCH]
    return [
        (torch.rand(BATCH, X_DIM, generator=gen) < probs[i * BATCH : (i + 1) * BATCH]).float() for i in range(steps)
    ], source


def trajectory(
    k: int, data: list[torch.Tensor], kernels: bool, nudge: float, keep: set[int]
) -> dict[int, torch.Tensor]:
    """The flattened parameters after each update in ``keep`` (0-based), with the kernels on or off, starting
    from weights multiplied by ``1 + nudge * noise``."""
    with kernels_on(kernels):
        torch.manual_seed(1)
        model = build_model(ModelConfig(), FlowConfig(kind="planar" if k else "none", length=k), X_DIM)
        params = [p for p in model.parameters() if p.requires_grad]
        if nudge:
            noise = torch.Generator().manual_seed(9)
            with torch.no_grad():
                for p in params:
                    p.mul_(1 + nudge * torch.randn(p.shape, generator=noise))
        opt = optimizer_from_config(OptimConfig(name="rmsprop", lr=1e-5, momentum=0.9, eps=1e-8), params)
        torch.manual_seed(2)
        kept = {}
        for t, x in enumerate(data):
            loss = annealed_loss(free_energy_terms(model, x, 1), beta_schedule(t, "eq20"), "eq20").mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            step_with_norm(opt, params)
            if t in keep:
                kept[t] = torch.cat([p.detach().flatten() for p in params]).clone()
        return kept


def measure(k: int, steps: int) -> tuple[list[dict], str]:
    keep = {t for t in (0, 1, 4, 9, 19, 49, 99, 199, 499) if t < steps} | {steps - 1}
    data, source = batches(steps)
    torch_ops = trajectory(k, data, kernels=False, nudge=0.0, keep=keep)
    compiled = trajectory(k, data, kernels=True, nudge=0.0, keep=keep)
    nudged = trajectory(k, data, kernels=False, nudge=1e-7, keep=keep)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / a.norm())

    rows = [
        {
            "update": t + 1,
            "kernels_vs_torch": rel(torch_ops[t], compiled[t]),
            "torch_vs_torch_nudged_1e-7": rel(torch_ops[t], nudged[t]),
        }
        for t in sorted(keep)
    ]
    return rows, source


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=80, help="planar flow length (default 80, Table 2's longest)")
    parser.add_argument("--steps", type=int, default=50, help="updates (default 50)")
    parser.add_argument("--out", type=Path, default=RESULTS / "divergence.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    retain_freed_memory()
    rows, source = measure(args.k, args.steps)
    print(f"# planar K={args.k}, RMSprop lr 1e-5 momentum 0.9, Eq. 20, batch {BATCH}; data: {source}")
    print("| update | kernels vs torch ops | torch ops vs torch ops from weights x (1 + 1e-7 noise) |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['update']} | {row['kernels_vs_torch']:.2e} | {row['torch_vs_torch_nudged_1e-7']:.2e} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.DataFrame(rows).to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
