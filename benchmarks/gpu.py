"""``python -m benchmarks.gpu``: nfvi on a GPU, in one command (about 3 minutes; ``--compile`` adds the compile time).

::

    python -m benchmarks.gpu                          # device=auto: CUDA when present
    python -m benchmarks.gpu --compile                # also trainer.compile=true (torch.compile; minutes)
    python -m benchmarks.gpu --device cpu --tiny      # the same code path on the CPU at toy sizes (the test suite)

Prints, for the two models that need a GPU:

- ``table2_k80``: Table 2's K=80 model as ``experiment=mnist_paper posterior=planar_80`` builds it (maxout
  784-1600/max4-400, z=40, amortized planar K=80, RMSprop, batch 100, Eq. 20 annealing, dynamic binarization);
- ``sylvester_osnf``: the gated-conv O-SNF model of ``experiment=sylvester_paper posterior=snf_orthogonal``
  (z=64, K=4, M=8, Adamax, batch 100, statically binarized MNIST);

updates/s of ``nfvi train``'s own update (:meth:`nfvi.vae.task.Trainer.train_step`: the training set resident on
the device, batches drawn there, the losses summed on the device and read once at the end) in fp32 and bf16
(``trainer.precision``), the host synchronisations counted per update (CUDA's sync debug mode), importance
sampling images/s at S=5000 (``nfvi.estimators.log_marginal_likelihood``, the evaluation path, fp32 and bf16),
the peak GPU memory of each phase, and the projected hours of the two protocols:

- Table 2: 500,000 updates + the test evaluation (-ln p(x) at S=200 and the -ELBO at 100 samples on 10,000
  images, from the S=5000 rate: IS cost is proportional to the number of samples); validation (every 5,000
  updates, 1 sample per image) is under 1% and not counted.
- Sylvester (per run; their Table 1 has 6 posteriors x 2 datasets = 12 runs): 500 updates per epoch (50,000
  images, batch 100), a validation -ELBO (1 sample, 10,000 images) per epoch, the test -ln p(x) at S=5000 on
  10,000 images. Early stopping ends a run 100 epochs after its best validation epoch; when is not known before
  the run, so the script prints the cost of the whole budget (2,000 epochs, the upper bound) and per 100 epochs.

Data: ``mnist.npz`` and ``binarized_mnist.npz`` from ``paths.data_dir`` (``$NFVI_DATA``) when present, else random
binary images of the same shape (the output says which; speed does not depend on the pixel values). Nothing
is downloaded. Figures are from one run on one device; rerun the fp32 rows beside any other timing you compare.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import nfvi.vae.task as train_task
from nfvi.cli import conf_dir
from nfvi.config import hydra_version_base
from nfvi.data import ImageData, load_dataset
from nfvi.estimators import default_batch_size, log_marginal_likelihood
from nfvi.precision import set_precision
from nfvi.runs import MetricsLog, retain_freed_memory, select_device
from nfvi.training import LossWindow

MODELS = {
    "table2_k80": ["experiment=mnist_paper", "posterior=planar_80"],
    "sylvester_osnf": ["experiment=sylvester_paper", "posterior=snf_orthogonal"],
}
DATA_FILES = {"mnist": "mnist.npz", "mnist_static": "binarized_mnist.npz"}
TABLE2_UPDATES, TABLE2_TEST_S, TABLE2_ELBO_S = 500_000, 200, 100
SYL_EPOCHS, SYL_UPDATES_PER_EPOCH, SYL_TEST_S = 2_000, 500, 5_000
TEST_IMAGES = VALID_IMAGES = 10_000


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(conf_dir("train")), **hydra_version_base()):
        return compose(config_name="train", overrides=overrides)


def _random_binary(n_train: int, n_test: int, dynamic: bool) -> ImageData:
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(n_train, 784, generator=gen) * 0.3  # Bernoulli means (dynamic) or 0/1 (static)
    train = (train * 255).round() / 255 if dynamic else (train > 0.2).float()
    test = (torch.rand(n_test, 784, generator=gen) < 0.13).float()
    return ImageData("random", train, test[: n_test // 2], test, dynamic=dynamic, source="random binary")


def load_data(cfg, tiny: bool) -> tuple[ImageData, str]:
    """The model's dataset from the data folder when its file is there, else random binary images."""
    path = Path(cfg.paths.data_dir) / DATA_FILES[cfg.dataset.name]
    if path.is_file() and not tiny:
        return load_dataset(cfg.dataset, root=cfg.paths.data_dir), f"real {cfg.dataset.name} ({path.name})"
    n_train, n_test = (64, 8) if tiny else (50_000, 10_000)
    why = "--tiny" if tiny else f"{path} not found"
    return _random_binary(n_train, n_test, cfg.dataset.binarize == "dynamic"), f"random binary images ({why})"


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (Linux: KiB)


def time_updates(trainer, device, seconds: float, warmup: int, chunk: int) -> dict:
    """Updates/s of ``trainer.train_step`` after ``warmup`` updates (compilation included there), in chunks of
    ``chunk`` updates until ``seconds`` have passed; host synchronisations per update counted on CUDA."""
    window = LossWindow(("loss", "grad_norm"), device, checked=("loss", "grad_norm"), defer=True)
    t0 = time.perf_counter()
    for _ in range(warmup):
        window.add(trainer.step + 1, **{k: v for k, v in trainer.train_step().items() if k != "neg_elbo"})
    window.read()
    _sync(device)
    warm_s = time.perf_counter() - t0
    _reset_peak(device)
    syncs, n = 0, 0
    t0 = time.perf_counter()
    while True:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(chunk):
                    step = trainer.train_step()
                    window.add(trainer.step, loss=step["loss"], grad_norm=step["grad_norm"])
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        syncs += sum("synchroniz" in str(w.message) for w in caught)
        n += chunk
        _sync(device)
        if time.perf_counter() - t0 >= seconds:
            break
    elapsed = time.perf_counter() - t0
    means = window.read()  # raises if a loss was not finite
    return {
        "updates_per_s": n / elapsed,
        "updates": n,
        "warmup_s": warm_s,
        "syncs_per_update": syncs / n if device.type == "cuda" else None,
        "peak_mb": _peak_mb(device),
        "loss": means["loss"],
    }


def time_is(model, x: torch.Tensor, num_samples: int, seconds: float, device) -> dict:
    """Images/s of ``log_marginal_likelihood`` at S=``num_samples`` (its default chunk for the device), calls of
    two chunks' worth of images until ``seconds`` have passed or ``x`` is used up."""
    per_call = 2 * max(1, default_batch_size(device) // num_samples)
    log_marginal_likelihood(model, x[:1], num_samples)  # warm-up
    _reset_peak(device)
    done, t0 = 0, time.perf_counter()
    while done < len(x):
        out = log_marginal_likelihood(model, x[done : done + per_call], num_samples)
        if not torch.isfinite(out).all():
            raise RuntimeError(f"importance sampling gave {out.tolist()}")
        done += len(out)
        if time.perf_counter() - t0 >= seconds:
            break
    return {"images_per_s": done / (time.perf_counter() - t0), "images": done, "peak_mb": _peak_mb(device)}


def projections(name: str, rates: dict, is_rate: float) -> list[str]:
    """Hours of the protocol at ``rates[precision]`` updates/s and ``is_rate`` images/s at S=5000 (fp32 evaluation)."""
    samples_per_s = is_rate * 5000  # importance samples (a decoder pass each) per second
    lines = []
    for precision, rate in rates.items():
        if name == "table2_k80":
            test = TEST_IMAGES * (TABLE2_TEST_S + TABLE2_ELBO_S) / samples_per_s
            lines.append(
                f"Table 2 protocol ({TABLE2_UPDATES:,} updates + test evaluation), {precision}: "
                f"{(TABLE2_UPDATES / rate + test) / 3600:.2f} h (of which evaluation {test / 3600:.2f} h)"
            )
        else:
            epoch = SYL_UPDATES_PER_EPOCH / rate + VALID_IMAGES / samples_per_s
            test = TEST_IMAGES * SYL_TEST_S / samples_per_s
            lines.append(
                f"Sylvester protocol per run, {precision}: {(SYL_EPOCHS * epoch + test) / 3600:.2f} h for all "
                f"{SYL_EPOCHS:,} epochs (no early stop; the upper bound), {100 * epoch / 3600:.2f} h per 100 epochs, "
                f"+ test S={SYL_TEST_S} {test / 3600:.2f} h"
            )
    return lines


def bench_model(name, device, args, tmp: Path) -> dict:
    overrides = [*MODELS[name], f"device={device}", "trainer.progress=false", "eval.progress=false"]
    if args.tiny:  # toy sizes for the test suite: the same code path
        overrides += ["trainer.batch_size=4", "flow.length=2", "trainer.val_images=4"]
        overrides += ["model.hidden=16"] if name == "table2_k80" else []
    base = compose_train(overrides)
    data, source = load_data(base, args.tiny)
    result = {"model": name, "data": source, "rows": []}
    rates = {}
    for precision in args.precisions:
        for compiled in [False, True] if args.compile else [False]:
            cfg = copy.deepcopy(base)
            cfg.trainer.precision, cfg.trainer.compile = precision, compiled
            out = tmp / f"{name}_{precision}_{int(compiled)}"
            trainer = train_task.Trainer(cfg, out, device, data=data, metrics=MetricsLog(out / "metrics.csv"))
            row = {"precision": precision, "compile": compiled}
            row |= time_updates(trainer, device, args.seconds, args.warmup, args.chunk)
            if not compiled:
                rates[precision] = row["updates_per_s"]
                set_precision(trainer.model, precision)
                x = data.test[: args.is_images]
                row["is"] = time_is(trainer.model, x, args.samples, args.seconds, device)
            result["rows"].append(row)
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    fp32_is = next(r["is"]["images_per_s"] for r in result["rows"] if r["precision"] == "fp32" and "is" in r)
    result["projections"] = projections(name, rates, fp32_is * args.samples / 5000)
    return result


def report(results: list[dict], facts: dict, args) -> str:
    lines = [f"# nfvi on {facts['device_name']} (torch {facts['torch']}, {facts['threads']} CPU threads)", ""]
    for res in results:
        lines.append(f"## {res['model']} ({' '.join(MODELS[res['model']])}); data: {res['data']}")
        lines.append(
            f"| precision | compile | updates/s | warm-up s | host syncs/update | peak MB (train) "
            f"| IS S={args.samples} images/s | peak MB (IS) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            syncs = "n/a (CPU)" if r["syncs_per_update"] is None else f"{r['syncs_per_update']:.2f}"
            is_rate = f"{r['is']['images_per_s']:.2f}" if "is" in r else ""
            is_peak = f"{r['is']['peak_mb']:.0f}" if "is" in r else ""
            lines.append(
                f"| {r['precision']} | {r['compile']} | {r['updates_per_s']:.1f} | {r['warmup_s']:.1f} | {syncs} "
                f"| {r['peak_mb']:.0f} | {is_rate} | {is_peak} |"
            )
        lines.append("")
        lines += [f"- projected: {line}" for line in res["projections"]]
        lines.append("")
    if args.tiny:
        lines.append("--tiny: toy sizes (batch 4, K=2); the projections mean nothing")
    lines.append("IS figures are fp32 for evaluation (nfvi evaluates in fp32); bf16 IS is shown for reference only.")
    lines.append("Sylvester projections are per run; early stopping ends a run sooner (see the module docstring).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (batch 4, K=2, S=8, 0.2 s per phase): a test")
    p.add_argument("--compile", action="store_true", help="also time trainer.compile=true (compiles for minutes)")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per phase (default 15; tiny 0.2)")
    p.add_argument("--samples", type=int, default=None, help="importance samples S (default 5000; tiny 8)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated trainer.precision values")
    p.add_argument("--only", default=",".join(MODELS), help=f"comma-separated models of: {', '.join(MODELS)}")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.precisions = args.precisions.split(",")
    args.seconds = args.seconds if args.seconds is not None else (0.2 if args.tiny else 15.0)
    args.samples = args.samples if args.samples is not None else (8 if args.tiny else 5000)
    args.warmup, args.chunk = (2, 2) if args.tiny else (20, 50)
    args.is_images = 4 if args.tiny else 200
    device = select_device(args.device)
    retain_freed_memory()  # as nfvi's commands set their process (nfvi.runs.Run)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    facts = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            results.append(bench_model(name, device, args, Path(tmp)))
    print(report(results, facts, args), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"facts": facts, "results": results}, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
