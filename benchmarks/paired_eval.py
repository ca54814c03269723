"""``python -m benchmarks.paired_eval RUN_A RUN_B``: the paired difference of two runs' test -ln p(x), in nats.

::

    python -m benchmarks.paired_eval outputs/precision/short_fp32 outputs/precision/short_bf16 --images 2000 -S 200

Both runs' best weights (``best.pt``) are evaluated in float32 on the same test images (the fixed subset
``nfvi evaluate`` draws for ``eval.max_images``, or all) with the same evaluation seed, and the per-image
differences ``B - A`` give the mean and its standard error. Pairing removes the image-to-image spread (about
0.57 nats of standard error for 2,000 images) from the comparison, e.g. of ``trainer.precision=fp32`` against
``bf16`` (docs/performance.md).

With ``--precision-b bf16`` run B's networks are evaluated under bf16 autocast (:func:`nfvi.precision.set_precision`;
log-densities, log-determinants and the log-sum-exp stay float32): given the same run twice, the paired difference
is what bf16 *evaluation* would move the reported -ln p(x) by, and the seconds per image of each side are printed::

    python -m benchmarks.paired_eval RUN RUN --precision-b bf16 -S 200
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from nfvi.data import load_dataset
from nfvi.data.images import DatasetConfig
from nfvi.estimators import log_marginal_likelihood
from nfvi.precision import PRECISIONS, set_precision
from nfvi.vae.checkpoint import load_checkpoint, model_from_state
from nfvi.vae.evaluate import test_subset


def per_image_nll(
    run: str | Path, images: int, num_samples: int, seed: int, data_dir: str | None, precision: str = "fp32"
) -> torch.Tensor:
    """-ln p(x) ``(N,)`` of the run's best weights on the test subset of ``images`` images (0: all), the networks in
    ``precision`` (fp32: the float32 model, as ``nfvi evaluate``)."""
    state = load_checkpoint(Path(run) / "best.pt")
    model = set_precision(model_from_state(state), precision)
    cfg = state["config"]
    data = load_dataset(DatasetConfig(**cfg["dataset"]), root=data_dir or cfg["paths"]["data_dir"])
    idx, _ = test_subset(len(data.test), images, seed)
    x = data.test if idx is None else data.test[idx]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return -log_marginal_likelihood(model, x, num_samples)


def paired(
    run_a,
    run_b,
    images: int = 0,
    num_samples: int = 200,
    seed: int = 0,
    data_dir: str | None = None,
    precision_a: str = "fp32",
    precision_b: str = "fp32",
) -> dict:
    """Means of both runs and the paired difference ``B - A`` with its standard error (nats); each side's seconds
    per image (``a_s_per_image``, ``b_s_per_image``; the data loading included)."""
    nll, sec = [], []
    for run, precision in ((run_a, precision_a), (run_b, precision_b)):
        start = time.perf_counter()
        nll.append(per_image_nll(run, images, num_samples, seed, data_dir, precision))
        sec.append((time.perf_counter() - start) / len(nll[-1]))
    a, b = nll
    d = b - a
    se = float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    means = {"a": float(a.mean()), "b": float(b.mean()), "b_minus_a": float(d.mean()), "se": se, "images": len(d)}
    timing = {"a_s_per_image": sec[0], "b_s_per_image": sec[1]}
    return means | timing | {"precision_a": precision_a, "precision_b": precision_b}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--images", type=int, default=0, help="test images (the eval.max_images subset; 0: all)")
    p.add_argument("-S", "--samples", type=int, default=200, help="importance samples per image (default 200)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (and the subset's; default 0)")
    p.add_argument("--data-dir", default=None, help="data folder (default: the runs' paths.data_dir)")
    for side in ("a", "b"):
        p.add_argument(
            f"--precision-{side}", default="fp32", choices=PRECISIONS, help=f"run {side.upper()}'s networks (fp32)"
        )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = paired(
        args.run_a, args.run_b, args.images, args.samples, args.seed, args.data_dir, args.precision_a, args.precision_b
    )
    print(
        f"A {res['a']:.3f} ({args.precision_a}, {res['a_s_per_image']:.4f} s/image)  B {res['b']:.3f} "
        f"({args.precision_b}, {res['b_s_per_image']:.4f} s/image)  B - A {res['b_minus_a']:+.3f} +- {res['se']:.3f} "
        f"nats (paired standard error, {res['images']} images, S={args.samples})"
    )
    return res


if __name__ == "__main__":
    main()
