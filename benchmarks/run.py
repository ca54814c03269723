"""``make bench`` / ``python -m benchmarks.run [--quick]``: speed of nfvi's training, IS and energy-fit paths.

Every figure is a ratio against a reference measured in the same process run (interleaved repeats, median),
because the machine may be shared. See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nfvi import kernels
from nfvi.config import FlowConfig, OptimConfig
from nfvi.estimators import default_batch_size, log_marginal_likelihood
from nfvi.runs import retain_freed_memory
from nfvi.training import optimizer_from_config, step_with_norm
from nfvi.vae.model import ModelConfig, build_model
from nfvi.vae.objectives import annealed_loss, beta_schedule, free_energy_terms

RESULTS = Path(__file__).parent / "results"
#: the clock of every timing (``--clock``): wall time, or this process's CPU time (``time.process_time``), which on
#: a shared machine leaves out the time the process waited for a core (meaningful with one torch thread only)
CLOCK = {"clock": time.perf_counter}
X_DIM, Z_DIM, HIDDEN, WINDOW, BATCH = 784, 40, 400, 4, 100


# ------------------------------------------------------------------------------------------------- machine
def machine_facts() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "malloc": "retained" if retain_freed_memory() else "default",  # nfvi.runs.retain_freed_memory
        "kernels": "compiled" if kernels.enabled() and kernels.load() is not None else "torch",  # nfvi.kernels
    }


def _timeit(fn, repeats: int, number: int) -> list[float]:
    """Seconds per call of ``fn``, one figure per repeat (``number`` calls each)."""
    out, clock = [], CLOCK["clock"]
    for _ in range(repeats):
        t0 = clock()
        for _ in range(number):
            fn()
        out.append((clock() - t0) / number)
    return out


def interleaved(fns: dict, repeats: int, number: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each ``fns[name]``, repeats interleaved across the functions."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k] += _timeit(fn, 1, number)
    return {k: statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------------------------------------- matmul rate
MATMUL_SHAPES = [(100, 784, 1600), (100, 400, 784), (10000, 40, 1600), (10000, 400, 784)]


def matmul_calls(shapes=MATMUL_SHAPES) -> dict:
    """``{"mm MxKxN": fn}``, one float32 ``torch.mm`` of each shape per call: to time beside the functions they are the
    floor of (:func:`interleaved`), so that both see the machine in the same state."""
    out = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        out[f"mm {m}x{k}x{n}"] = lambda a=a, b=b: torch.mm(a, b)
    return out


def rate_of(sec: dict) -> float:
    """Median GFLOP/s over the ``mm MxKxN`` entries of ``sec`` (seconds per call, :func:`matmul_calls`)."""
    rates = []
    for name, t in sec.items():
        if name.startswith("mm "):
            m, k, n = (int(v) for v in name[3:].split("x"))
            rates.append(2 * m * k * n / t / 1e9)
    return statistics.median(rates)


def matmul_rate(repeats: int = 5, shapes=MATMUL_SHAPES) -> float:
    """Median float32 ``torch.mm`` GFLOP/s over representative (m, k, n) shapes of this model."""
    rates = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        number = max(1, int(2e8 / (2 * m * k * n)))
        sec = interleaved({"mm": lambda: torch.mm(a, b)}, repeats, number)["mm"]
        rates.append(2 * m * k * n / sec / 1e9)
    return statistics.median(rates)


# ------------------------------------------------------------------------------------------------- training
def forward_flops_vae(batch: int, k: int, samples: int = 1) -> float:
    """Matmul FLOPs of one forward pass of the maxout VAE with K amortized planar layers (2 m k n each)."""
    enc = 2 * batch * (X_DIM * HIDDEN * WINDOW + HIDDEN * 2 * Z_DIM + HIDDEN * k * (2 * Z_DIM + 1))
    dec = 2 * batch * samples * (Z_DIM * HIDDEN * WINDOW + HIDDEN * X_DIM)
    flow = 4 * batch * samples * k * Z_DIM  # w.z and u*h per layer
    return enc + dec + flow


def make_nfvi_step(k: int, batch: int = BATCH, seed: int = 0, compile_optimizer: bool = True):
    """One update exactly as ``nfvi train experiment=mnist_paper`` (Trainer.fit) does it: Eq. 20 loss, backward,
    clip, RMSprop step (``optim.compile=true``, as the experiment sets it; ``compile_optimizer=False``: eager)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(), FlowConfig(kind="planar" if k else "none", length=k), X_DIM)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = OptimConfig(name="rmsprop", lr=1e-5, momentum=0.9, compile=compile_optimizer)
    opt = optimizer_from_config(optim, params)
    x = (torch.rand(batch, X_DIM) < 0.3).float()
    model.train()
    state = {"step": 0}

    def step():
        beta = beta_schedule(state["step"], "eq20")
        terms = free_energy_terms(model, x, num_samples=1)
        loss = annealed_loss(terms, beta, "eq20").mean()
        float(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        float(step_with_norm(opt, params))  # clip_gradients(params, inf) and opt.step(), as Trainer.train_step
        state["step"] += 1

    return step


@contextlib.contextmanager
def kernels_on(on: bool):
    """``NFVI_KERNELS`` set to 1 or 0 (:mod:`nfvi.kernels` or torch operations) inside the block, restored after."""
    before = os.environ.get("NFVI_KERNELS")
    os.environ["NFVI_KERNELS"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["NFVI_KERNELS"]
        else:
            os.environ["NFVI_KERNELS"] = before


def without_kernels(step):
    """``step`` run with ``NFVI_KERNELS=0`` (torch operations instead of :mod:`nfvi.kernels`), the setting restored
    after each call, so that it interleaves with steps that use the kernels."""

    def run():
        with kernels_on(False):
            step()

    return run


def make_prev_step(k: int, batch: int = BATCH, seed: int = 0):
    """The same update on the previous code path (benchmarks/reference_update.py: the planar chain, clipping and
    optimizer as of c11e01b), to measure the change in the same run."""
    from benchmarks.reference_update import reference_optimizer, reference_step, use_reference_code

    torch.manual_seed(seed)
    model = build_model(ModelConfig(), FlowConfig(kind="planar" if k else "none", length=k), X_DIM)
    use_reference_code(model)
    params = [p for p in model.parameters() if p.requires_grad]
    step = reference_step(model, params, reference_optimizer("rmsprop", params, lr=1e-5, momentum=0.9))
    x = (torch.rand(batch, X_DIM) < 0.3).float()
    model.train()
    state = {"step": 0}

    def run():
        step(x, beta_schedule(state["step"], "eq20"))
        state["step"] += 1

    return run


class NaiveVAE(nn.Module):
    """The same model written the straightforward way: per-layer planar heads, a Python loop, torch.distributions."""

    def __init__(self, k: int):
        super().__init__()
        self.enc = nn.Linear(X_DIM, HIDDEN * WINDOW)
        self.mu = nn.Linear(HIDDEN, Z_DIM)
        self.log_sigma = nn.Linear(HIDDEN, Z_DIM)
        self.heads_u = nn.ModuleList(nn.Linear(HIDDEN, Z_DIM) for _ in range(k))
        self.heads_w = nn.ModuleList(nn.Linear(HIDDEN, Z_DIM) for _ in range(k))
        self.heads_b = nn.ModuleList(nn.Linear(HIDDEN, 1) for _ in range(k))
        self.dec1 = nn.Linear(Z_DIM, HIDDEN * WINDOW)
        self.dec2 = nn.Linear(HIDDEN, X_DIM)

    def loss(self, x, beta):
        d = torch.distributions
        h = self.enc(x).view(x.shape[0], HIDDEN, WINDOW).max(-1)[0]
        q0 = d.Normal(self.mu(h), self.log_sigma(h).exp())
        z0 = q0.rsample()
        z = z0
        sum_ladj = 0
        for hu, hw, hb in zip(self.heads_u, self.heads_w, self.heads_b, strict=True):
            u, w, b = hu(h), hw(h), hb(h)
            wu = (w * u).sum(-1, keepdim=True)
            u_hat = u + (-1 + F.softplus(wu) - wu) * w / (w**2).sum(-1, keepdim=True)
            a = (w * z).sum(-1, keepdim=True) + b
            psi = (1 - torch.tanh(a) ** 2) * w
            sum_ladj = sum_ladj + torch.log((1 + (psi * u_hat).sum(-1)).abs() + 1e-8)
            z = z + u_hat * torch.tanh(a)
        hd = self.dec1(z).view(x.shape[0], HIDDEN, WINDOW).max(-1)[0]
        log_px = d.Bernoulli(logits=self.dec2(hd)).log_prob(x).sum(-1)
        log_pz = d.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qk = q0.log_prob(z0).sum(-1) - sum_ladj
        return (log_qk - beta * (log_px + log_pz)).mean()


def make_naive_step(k: int, batch: int = BATCH, seed: int = 0):
    torch.manual_seed(seed)
    model = NaiveVAE(k)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-5, momentum=0.9)
    x = (torch.rand(batch, X_DIM) < 0.3).float()

    def step():
        loss = model.loss(x, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def bench_training(ks, repeats: int, number: int) -> list[dict]:
    """Per K, the update beside its references and the float32 ``torch.mm`` calls of the floor, interleaved."""
    rows = []
    for k in ks:
        fns = {"nfvi": make_nfvi_step(k), "naive": make_naive_step(k), "prev": make_prev_step(k)}
        fns["torch_ops"] = without_kernels(make_nfvi_step(k))  # NFVI_KERNELS=0: the update before nfvi.kernels
        sec = interleaved(fns | matmul_calls(), repeats, number)
        rate = rate_of(sec)
        floor = 3 * forward_flops_vae(BATCH, k) / (rate * 1e9)
        rows.append(
            {
                "bench": f"train K={k}",
                "matmul_gflops": rate,
                "nfvi_per_s": 1 / sec["nfvi"],
                "ref_per_s": 1 / sec["naive"],
                "speedup_vs_ref": sec["naive"] / sec["nfvi"],
                "floor_per_s": 1 / floor,
                "time_over_floor": sec["nfvi"] / floor,
                "prev_per_s": 1 / sec["prev"],
                "speedup_vs_prev": sec["prev"] / sec["nfvi"],
                "prev_over_floor": sec["prev"] / floor,
                "torch_ops_over_floor": sec["torch_ops"] / floor,
                "speedup_vs_torch_ops": sec["torch_ops"] / sec["nfvi"],
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------- importance sampling
def _is_model(k: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(), FlowConfig(kind="planar", length=k), X_DIM)


def naive_log_px(model, x, num_samples: int, chunk: int = 1000):
    """One image at a time, samples in chunks, with torch.no_grad: the straightforward loop."""
    out = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi = x[i : i + 1]
            lws = []
            chunk = min(chunk, num_samples)
            for _ in range(num_samples // chunk):
                z, log_q = model.posterior(xi, chunk)
                lws.append(model.log_joint(xi, z) - log_q)
            out.append(torch.logsumexp(torch.cat(lws).double(), 0) - math.log(num_samples))
    return torch.cat(out)


def bench_is(num_images: int, num_samples: int, repeats: int, chunks=(None, 10000), memory: bool = True) -> list[dict]:
    """nfvi.evaluate.log_marginal_likelihood at each chunk size (``batch_size``; None = ``nfvi evaluate``'s
    default, :func:`nfvi.evaluate.default_batch_size`) beside the one-image-at-a-time loop in chunks of 1000."""
    import copy

    from benchmarks.reference_update import use_reference_code

    model = _is_model()
    prev = copy.deepcopy(model)  # the same weights on the previous code (benchmarks/reference_update.py)
    use_reference_code(prev)
    x = (torch.rand(num_images, X_DIM) < 0.3).float()
    fns = {f"nfvi_{c}": (lambda c=c: log_marginal_likelihood(model, x, num_samples, batch_size=c)) for c in chunks}
    fns["naive"] = lambda: naive_log_px(model, x, num_samples)
    fns["prev"] = lambda: log_marginal_likelihood(prev, x, num_samples)
    diffs = []
    for m in (model, prev):  # same seed, same draws: the estimates agree to float32 rounding
        torch.manual_seed(0)
        diffs.append(log_marginal_likelihood(m, x, num_samples))
    max_diff = float((diffs[0] - diffs[1]).abs().max())
    sec = interleaved(fns | matmul_calls(), repeats, 1, warmup=1)
    rate = rate_of(sec)
    flops = forward_flops_vae(1, 10, num_samples) * num_images
    ref_mem = peak_rss_mb("naive", num_images, num_samples, 1000) if memory else float("nan")
    rows = []
    for c in chunks:
        t = sec[f"nfvi_{c}"]
        rows.append(
            {
                "bench": f"IS S={num_samples} K=10 batch_size={c or f'default ({default_batch_size(None)})'}",
                "matmul_gflops": rate,
                "nfvi_s_per_image": t / num_images,
                "ref_s_per_image": sec["naive"] / num_images,
                "speedup_vs_ref": sec["naive"] / t,
                "gflops": flops / t / 1e9,
                "frac_of_matmul": flops / t / 1e9 / rate,
                "ref_frac_of_matmul": flops / sec["naive"] / 1e9 / rate,
                "peak_mb": peak_rss_mb("nfvi", num_images, num_samples, c) if memory else float("nan"),
                "ref_peak_mb": ref_mem,
                "prev_frac_of_matmul": flops / sec["prev"] / 1e9 / rate,
                "speedup_vs_prev": sec["prev"] / t,
                "max_diff_vs_prev_nats": max_diff,
            }
        )
    return rows


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_child(which: str, num_images: int, num_samples: int, chunk: int | None) -> float:
    """In a fresh process: warm up on 2 samples, reset the kernel's peak-RSS mark, run, return peak minus start (MB)."""
    model = _is_model()
    x = (torch.rand(num_images, X_DIM) < 0.3).float()

    def run(xs, s=num_samples, c=chunk):
        if which == "nfvi":
            return log_marginal_likelihood(model, xs, s, batch_size=c)
        return naive_log_px(model, xs, s, c)

    run(x[:1], 2, 2)  # loads kernels and libraries with tiny tensors
    base = _status_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        run(x)
        return _status_mb("VmHWM") - base
    except OSError:  # fall back: ru_maxrss (never reset, so it also counts the warm-up)
        run(x)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def peak_rss_mb(which: str, num_images: int, num_samples: int, chunk: int) -> float:
    """Peak resident-memory growth (MB) of one IS run, measured in a subprocess (see :func:`_peak_child`)."""
    code = (
        f"import torch; torch.set_num_threads({torch.get_num_threads()}); from benchmarks.run import _peak_child; "
        f"print(_peak_child('{which}', {num_images}, {num_samples}, {chunk}))"
    )
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    return float(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- 2-D energies
def _u1(z):
    from nfvi.energies import u1

    return u1(z)


def _kl(sample_fn, n: int = 20000) -> tuple[float, float]:
    """KL(q || p) = E_q[log q + U] + log Z for U1 (log Z by quadrature on [-4, 4]^2), and its MC standard error."""
    from nfvi.energies import log_normalizer

    with torch.no_grad():
        z, log_q = sample_fn(n)
        f = (log_q + _u1(z)).double()
        return float(f.mean()) + log_normalizer(_u1), float(f.std() / math.sqrt(n))


def _annealed_fit_step(sample, optimizer, samples: int):
    """One update of the annealed 2-D objective E[log q + beta_t U1], beta_t = min(1, 0.01 + t/1000), for any library.

    ``sample(n) -> (z (n, 2), log q (n,))`` draws from the library's flow; ``optimizer`` holds its parameters.
    """
    state = {"step": 0}

    def step():
        beta = min(1.0, 0.01 + state["step"] / 1000)
        z, log_q = sample(samples)
        loss = (log_q + beta * _u1(z)).mean()
        float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["step"] += 1

    return step


def make_energy_nfvi(k: int, samples: int):
    """``nfvi energy``'s update (nfvi.energy.task.fit): EnergyModel over a global planar flow, Adam at lr 1e-2."""
    from nfvi.energy import EnergyModel
    from nfvi.flows import build_flow

    model = EnergyModel(build_flow("planar", 2, k))
    opt = optimizer_from_config(OptimConfig(name="adam", lr=1e-2), model.parameters())
    return _annealed_fit_step(model, opt, samples), model


def make_energy_normflows(k: int, samples: int):
    import normflows as nf

    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2), [nf.flows.Planar((2,)) for _ in range(k)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return _annealed_fit_step(model.sample, opt, samples), model.sample


def make_energy_pyro(k: int, samples: int):
    import pyro.distributions as pd
    import pyro.distributions.transforms as pt

    loc, log_scale = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    layers = nn.ModuleList(pt.Planar(2) for _ in range(k))
    opt = torch.optim.Adam([loc, log_scale, *layers.parameters()], lr=1e-2)

    def sample(n):
        dist = pd.TransformedDistribution(pd.Normal(loc, log_scale.exp()).to_event(1), list(layers))
        z = dist.rsample((n,))
        return z, dist.log_prob(z)

    return _annealed_fit_step(sample, opt, samples), sample


def bench_energy(
    ks, samples: int, fit_steps: int, repeats: int, number: int, seeds: int = 1
) -> tuple[list[dict], list[str]]:
    notes = []
    makers = {"nfvi": make_energy_nfvi}
    for name, maker in (("normflows", make_energy_normflows), ("pyro", make_energy_pyro)):
        try:
            __import__("normflows" if name == "normflows" else "pyro")
            makers[name] = maker
        except ImportError:
            notes.append(f"{name} is not installed: skipped (pip install normflows pyro-ppl)")
    rows = []
    for k in ks:
        built = {}
        for name, maker in makers.items():
            torch.manual_seed(0)
            built[name] = maker(k, samples)
        sec = interleaved({n: b[0] for n, b in built.items()}, repeats, number)
        row = {"bench": f"energy U1 K={k}", "nfvi_per_s": 1 / sec["nfvi"]}
        for n in makers:
            if n != "nfvi":
                row[f"{n}_per_s"] = 1 / sec[n]
        others = [sec[n] for n in makers if n != "nfvi"]
        if others:
            row["speedup_vs_ref"] = min(others) / sec["nfvi"]
        if k == max(ks) and fit_steps:
            for name, maker in makers.items():  # fresh models, fixed number of steps, median over seeds
                kls = []
                for seed in range(seeds):
                    torch.manual_seed(seed)
                    step, sampler = maker(k, samples)
                    for _ in range(fit_steps):
                        step()
                    kls.append(_kl(sampler))
                row[f"kl_{name}"] = statistics.median(v[0] for v in kls)
                row[f"kl_max_{name}"] = max(v[0] for v in kls)
        rows.append(row)
    return rows, notes


# ------------------------------------------------------------------------------------------------- report
def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_results(
    sections: dict[str, list[dict]], facts: dict, notes: list[str], command: str, out: Path = RESULTS
) -> str:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    md = [f"# nfvi benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""]
    md.append(f"Command: `{command}`  ")
    md.append("Machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()) + "  ")
    md.append(
        f"Measured float32 matmul rate: {facts.get('matmul_gflops', float('nan')):.1f} GFLOP/s at the start; the "
        "floors use each table's own `matmul_gflops`, timed interleaved with what they are the floor of"
    )
    md.append("")
    for name, rows in sections.items():
        if not rows:
            continue
        df = pd.DataFrame(rows)
        df.to_csv(out / f"{name}.csv", index=False)
        md += [f"## {name}", "", "| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
        md += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
        md.append("")
    md += [f"- {n}" for n in notes]
    text = "\n".join(md) + "\n"
    (out / "results.md").write_text(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repeats and sizes (about 2 minutes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training/IS (0 = torch's default)")
    p.add_argument(
        "--only", default="train,is,nice,energy,sylvester", help="comma list of train, is, nice, energy, sylvester"
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or the process's CPU time (robust on a shared machine; with --threads 1 only)",
    )
    args = p.parse_args(argv)
    retain_freed_memory()  # as nfvi's commands set their process (nfvi.runs.Run)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            p.error("--clock cpu needs --threads 1 (CPU time adds up over threads)")
        CLOCK["clock"] = time.process_time
    only = set(args.only.split(","))
    q = args.quick
    facts = machine_facts()
    facts["clock"] = args.clock
    rate = matmul_rate(3 if q else 5)
    facts["matmul_gflops"] = rate
    print(f"matmul {rate:.1f} GFLOP/s", flush=True)
    sections, notes = {}, []
    if "train" in only:
        sections["train"] = bench_training([0, 10, 80], repeats=3 if q else 5, number=5 if q else 10)
        print(sections["train"], flush=True)
    if "is" in only:
        sections["importance_sampling"] = bench_is(4 if q else 10, 5000, repeats=3)
        print(sections["importance_sampling"], flush=True)
    if "nice" in only:
        from benchmarks.nice import bench_nice

        sections["nice"] = bench_nice(80, repeats=3 if q else 5, number=3 if q else 5)
        print(sections["nice"], flush=True)
        notes.append(
            "nice: amortized NICE K=80 (z=40, 400 encoder features, coupling MLPs 64 wide); ref = the same couplings "
            "reading cat([z_a, h]) with index assignment (benchmarks/nice.py)"
        )
    if "energy" in only:
        threads = torch.get_num_threads()
        fit_steps, seeds = (300, 1) if q else (1500, 3)
        torch.set_num_threads(1)  # 2-D problems: one thread (as nfvi energy runs them)
        sections["energy"], n = bench_energy(
            [2, 8, 32], samples=256, fit_steps=fit_steps, repeats=3 if q else 5, number=10 if q else 20, seeds=seeds
        )
        torch.set_num_threads(threads)
        notes += n + [
            "energy: 1 torch thread, 256 samples/step, Adam lr 1e-2, beta_t = min(1, 0.01 + t/1000) for all libraries; "
            f"kl_* = median over {seeds} seed(s) of KL(q||p) after {fit_steps} steps at K=32 (20,000 draws, "
            "log Z by quadrature; MC standard error ~0.003), kl_max_* = worst seed"
        ]
    if "sylvester" in only:
        from benchmarks.sylvester import bench_sylvester

        sections["sylvester"] = bench_sylvester(100, repeats=2 if q else 3, number=1 if q else 2, is_images=1)
        print(sections["sylvester"], flush=True)
        notes.append(
            "sylvester: gated-conv VAE + amortized O-SNF (K=4, M=8, z=64, batch 100) per update, ref = the "
            "sylvester-flows code's OrthogonalSylvesterVAE style (benchmarks/sylvester.py); IS at S=5000 on 1 image "
            "(fresh process; peak_mb = peak RSS growth)"
        )
    notes.append(f"load average at start: {facts['load_avg']} (shared machine; ratios are from one process run)")
    text = write_results(sections, facts, notes, "python -m benchmarks.run " + " ".join(argv or sys.argv[1:]))
    print(text)


if __name__ == "__main__":
    main()
