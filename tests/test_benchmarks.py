"""Keep the benchmark harness from rotting: run its functions on tiny sizes (no timing is asserted)."""

import math

import pytest
import torch

from benchmarks import run as bench
from tests.conftest import needs_cxx


def test_training_steps_run_and_floor_counts_flops():
    for k in (0, 2):
        bench.make_nfvi_step(k, batch=4)()
        bench.make_naive_step(k, batch=4)()
    assert bench.forward_flops_vae(100, 10) > bench.forward_flops_vae(100, 0) > 0


def test_naive_is_matches_nfvi_estimator_in_distribution():
    torch.manual_seed(0)
    model = bench._is_model(k=2)
    x = (torch.rand(2, bench.X_DIM) < 0.3).float()
    a = bench.naive_log_px(model, x, 20, chunk=10)
    b = bench.log_marginal_likelihood(model, x, 20, batch_size=10)
    assert a.shape == b.shape == (2,) and torch.isfinite(a).all()
    assert (a - b).abs().max() < 50  # same estimator, different draws


def test_harness_tiny(tmp_path):
    rate = bench.matmul_rate(1, shapes=[(8, 8, 8)])
    assert rate > 0
    rows = bench.bench_is(1, 20, repeats=1, chunks=(20,), memory=False)
    assert rows[0]["speedup_vs_ref"] > 0 and rows[0]["matmul_gflops"] > 0
    energy, notes = bench.bench_energy([2], samples=8, fit_steps=2, repeats=1, number=1)
    assert math.isfinite(energy[0]["kl_nfvi"])
    text = bench.write_results({"is": rows, "energy": energy}, bench.machine_facts(), notes, "test", out=tmp_path)
    assert "| bench |" in text and (tmp_path / "energy.csv").exists()


@pytest.mark.parametrize("context_dim", [0, 6])
def test_fast_planar_forward_matches_transform_chain(context_dim, float64):
    from nfvi.flows import Flow, build_flow

    torch.manual_seed(0)
    flow = build_flow("planar", 3, 4, context_dim=context_dim).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    h = torch.randn(5, 6, dtype=torch.float64, requires_grad=True) if context_dim else None
    z = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (flow.forward, lambda z, h: Flow.forward(flow, z, h)):
        z_k, log_det = fn(z, h)
        loss = z_k.sin().sum() + log_det.cos().sum()
        grads.append(torch.autograd.grad(loss, [z, *flow.parameters()] + ([h] if context_dim else [])))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_sylvester_benchmark_runs_on_tiny_sizes():
    from benchmarks import sylvester

    rows = sylvester.bench_sylvester(2, repeats=1, number=1, is_images=1, num_samples=4)
    assert rows[0]["nfvi_per_s"] > 0 and rows[0]["ref_per_s"] > 0 and rows[1]["peak_mb"] == rows[1]["peak_mb"]


def test_the_sylvester_reference_orthogonalises_every_q():
    import torch

    from benchmarks import sylvester

    ref = sylvester.RefOrthogonalSylvesterVAE()
    q = ref.batch_construct_orthogonal(ref.amor_q(torch.randn(3, sylvester.H)))
    eye = torch.eye(sylvester.M).expand(sylvester.K, 3, -1, -1)
    assert torch.allclose(q.transpose(-1, -2) @ q, eye, atol=1e-5)


def test_nice_reference_computes_the_same_flow_and_the_benchmark_runs():
    from benchmarks import nice

    flow = nice._flow(4).double()
    z, h = torch.randn(3, 5, nice.Z, dtype=torch.float64), torch.randn(5, nice.H, dtype=torch.float64)
    assert torch.allclose(flow(z, h)[0], nice.RefNICE(flow)(z, h), atol=1e-12)
    rows = nice.bench_nice(2, repeats=1, number=1, batch=3, is_images=2, num_samples=3)
    assert [r["speedup_vs_ref"] > 0 for r in rows] == [True, True]


def test_gpu_benchmark_runs_on_the_cpu_at_toy_sizes(capsys):
    """benchmarks/gpu.py's code path (nfvi train's update, resident batches, bf16, IS) with --device cpu --tiny."""
    from benchmarks import gpu

    results = gpu.main(["--device", "cpu", "--tiny"])
    assert [r["model"] for r in results] == ["table2_k80", "sylvester_osnf"]
    for res in results:
        assert [(r["precision"], r["updates_per_s"] > 0, r["is"]["images_per_s"] > 0) for r in res["rows"]] == [
            ("fp32", True, True),
            ("bf16", True, True),
        ]
        assert "random binary" in res["data"] and len(res["projections"]) == 2
    out = capsys.readouterr().out
    assert "Table 2 protocol" in out and "Sylvester protocol per run" in out


def test_paired_eval_of_a_run_with_itself_is_zero(tmp_path):
    from benchmarks import paired_eval
    from nfvi.vae import task as train_mod
    from tests.test_train import cfg_of

    train_mod.train(cfg_of("trainer.steps=2", "trainer.val_every=2"), tmp_path / "a")
    res = paired_eval.paired(tmp_path / "a", tmp_path / "a", images=10, num_samples=4)
    assert res["images"] == 10 and res["b_minus_a"] == 0.0 and res["se"] == 0.0 and res["a"] > 0
    bf16 = paired_eval.paired(tmp_path / "a", tmp_path / "a", images=10, num_samples=4, precision_b="bf16")
    assert bf16["a"] == res["a"] and bf16["b"] != res["b"] and abs(bf16["b_minus_a"]) < 1.0  # autocast moved it
    assert bf16["precision_b"] == "bf16" and bf16["b_s_per_image"] > 0


@pytest.mark.parametrize("optim", ["rmsprop", "adamax", "rmsprop-compiled", "rmsprop-torch"])
def test_update_ends_where_the_previous_code_ends_after_200_updates(optim, monkeypatch):
    """200 fixed-seed updates of a small amortized-planar VAE: the current update (planar_chain_ladj,
    step_with_norm, optimizer_from_config: on the CPU the compiled kernels, RMSprop's step with the norm included;
    ``rmsprop-compiled``: without the kernels, optim.compile=true's torch.compile step; ``rmsprop-torch``: without
    the kernels, torch's own ops throughout) and the frozen previous one (benchmarks/reference_update.py) end with
    the same parameters to float32 rounding."""
    name = optim
    optim, compiled = name.split("-")[0], name.endswith("-compiled")
    if compiled:
        needs_cxx()
    if name != optim:
        monkeypatch.setenv("NFVI_KERNELS", "0")
    from benchmarks.reference_update import reference_optimizer, reference_step, use_reference_code
    from nfvi.config import FlowConfig, OptimConfig
    from nfvi.training import optimizer_from_config, step_with_norm
    from nfvi.vae.model import ModelConfig, build_model
    from nfvi.vae.objectives import annealed_loss, beta_schedule, free_energy_terms

    gen = torch.Generator().manual_seed(0)
    data = (torch.rand(200, 16, 30, generator=gen) < 0.3).float()
    # RMSprop at 1e-3 with momentum 0.9 is chaotic on this tiny model (a 1e-8 difference doubles every update
    # from its huge first steps, whichever code runs); at 1e-4 (paper 1e-5) and Adamax at 1e-3 it is not.
    lr, momentum = (1e-4, 0.9) if optim == "rmsprop" else (1e-3, 0.0)
    models = []
    for previous in (False, True):
        torch.manual_seed(1)
        model = build_model(
            ModelConfig(latent_dim=6, hidden=12, maxout_window=2), FlowConfig(kind="planar", length=8), 30
        )
        params = [p for p in model.parameters() if p.requires_grad]
        initial = {k: p.detach().clone() for k, p in model.named_parameters()}
        if previous:
            use_reference_code(model)
            step = reference_step(model, params, reference_optimizer(optim, params, lr, momentum, eps=1e-8))
        else:
            optim_cfg = OptimConfig(name=optim, lr=lr, momentum=momentum, eps=1e-8, compile=compiled)
            opt = optimizer_from_config(optim_cfg, params)

            def step(x, beta, model=model, params=params, opt=opt):
                loss = annealed_loss(free_energy_terms(model, x, 1), beta, "eq20").mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                step_with_norm(opt, params)  # as Trainer.train_step without clipping

        torch.manual_seed(2)
        for t in range(200):
            step(data[t], beta_schedule(t, "eq20", steps=100))
        models.append(model)
    new, old = (dict(m.named_parameters()) for m in models)
    moved = max(float((new[k].detach() - p0).abs().max()) for k, p0 in initial.items())
    assert moved > 1e-2, moved  # the updates did move the parameters
    for name, p in new.items():
        torch.testing.assert_close(p, old[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_importance_sampling_gives_the_previous_codes_numbers():
    """log_marginal_likelihood on the current model code and on the previous one (benchmarks/reference_update.py:
    torch.distributions' Bernoulli, maxout over windows, the previous planar chain), same weights and seed."""
    import copy

    from benchmarks.reference_update import use_reference_code

    torch.manual_seed(0)
    model = bench._is_model(k=3)
    prev = copy.deepcopy(model)
    use_reference_code(prev)
    x = (torch.rand(3, bench.X_DIM) < 0.3).float()
    for batch_size in (40, 100):  # several images per chunk, and one image in chunks
        out = []
        for m in (model, prev):
            torch.manual_seed(1)
            out.append(bench.log_marginal_likelihood(m, x, 50, batch_size=batch_size))
        torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=2e-4)


def test_divergence_script_runs_and_the_kernels_stay_within_rounding_at_first(tmp_path, monkeypatch):
    """benchmarks/divergence.py at toy size (random images): it writes its table, and after one update the
    kernels' parameters are within float32 rounding of torch's (the growth after that is the protocol's chaos,
    docs/performance.md)."""
    import pandas as pd

    from benchmarks import divergence

    monkeypatch.delenv("NFVI_DATA", raising=False)
    threads = torch.get_num_threads()
    try:
        divergence.main(["--k", "2", "--steps", "2", "--out", str(tmp_path / "d.csv")])
    finally:
        torch.set_num_threads(threads)
    table = pd.read_csv(tmp_path / "d.csv")
    assert list(table["update"]) == [1, 2]
    assert table["kernels_vs_torch"].iloc[0] < 1e-6 and table["torch_vs_torch_nudged_1e-7"].iloc[0] > 0
