"""``python -m benchmarks.paired_eval RUN_A RUN_B``: the paired difference of two runs' test -ln p(x), in nats.

::

    python -m benchmarks.paired_eval outputs/precision/short_fp32 outputs/precision/short_bf16 --images 2000 -S 200

Both runs' best weights (``best.pt``) are evaluated in float32 on the same test images (the fixed subset
``nfvi evaluate`` draws for ``eval.max_images``, or all) with the same evaluation seed, and the per-image
differences ``B - A`` give the mean and its standard error. Pairing removes the image-to-image spread (about
0.57 nats of standard error for 2,000 images) from the comparison, e.g. of ``trainer.precision=fp32`` against
``bf16`` (docs/performance.md).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from nfvi.data import load_dataset
from nfvi.data.images import DatasetConfig
from nfvi.estimators import log_marginal_likelihood
from nfvi.vae.checkpoint import load_checkpoint, model_from_state
from nfvi.vae.evaluate import test_subset


def per_image_nll(run: str | Path, images: int, num_samples: int, seed: int, data_dir: str | None) -> torch.Tensor:
    """-ln p(x) ``(N,)`` of the run's best weights on the test subset of ``images`` images (0: all), float32 model."""
    state = load_checkpoint(Path(run) / "best.pt")
    model = model_from_state(state)
    cfg = state["config"]
    data = load_dataset(DatasetConfig(**cfg["dataset"]), root=data_dir or cfg["paths"]["data_dir"])
    idx, _ = test_subset(len(data.test), images, seed)
    x = data.test if idx is None else data.test[idx]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return -log_marginal_likelihood(model, x, num_samples)


def paired(run_a, run_b, images: int = 0, num_samples: int = 200, seed: int = 0, data_dir: str | None = None) -> dict:
    """Means of both runs and the paired difference ``B - A`` with its standard error (nats)."""
    a, b = (per_image_nll(r, images, num_samples, seed, data_dir) for r in (run_a, run_b))
    d = b - a
    se = float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"a": float(a.mean()), "b": float(b.mean()), "b_minus_a": float(d.mean()), "se": se, "images": len(d)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--images", type=int, default=0, help="test images (the eval.max_images subset; 0: all)")
    p.add_argument("-S", "--samples", type=int, default=200, help="importance samples per image (default 200)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (and the subset's; default 0)")
    p.add_argument("--data-dir", default=None, help="data folder (default: the runs' paths.data_dir)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res = paired(args.run_a, args.run_b, args.images, args.samples, args.seed, args.data_dir)
    print(
        f"A {res['a']:.3f}  B {res['b']:.3f}  B - A {res['b_minus_a']:+.3f} +- {res['se']:.3f} nats "
        f"(paired standard error, {res['images']} images, S={args.samples})"
    )
    return res


if __name__ == "__main__":
    main()
