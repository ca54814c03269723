"""nfvi.kernels: the compiled planar chain and maxout give torch's numbers (values and gradients, edge cases
included), fall back to torch operations where they cannot be compiled, and take only NFVI_KERNELS=0|1."""

from __future__ import annotations

import logging

import pytest
import torch

from nfvi import kernels
from nfvi.errors import NfviError
from nfvi.transforms import planar_chain_ladj
from nfvi.vae.model import _window_amax, window_max

needs_kernels = pytest.mark.skipif(kernels.load() is None, reason="no C compiler here: the kernels are not built")


def test_the_kernels_build_wherever_there_is_a_c_compiler():
    """Where a C compiler is (CI, this project's machines), the kernels build and load: the tests above are not
    skipped for a broken source."""
    if kernels._compiler() is None:
        pytest.skip("no C compiler")
    assert kernels.load() is not None


def _chain(z, w, u, b, compiled: bool, monkeypatch):
    """planar_chain_ladj's outputs and the gradients of a random projection of them, with the kernels on or off."""
    monkeypatch.setenv("NFVI_KERNELS", "1" if compiled else "0")
    leaves = [t.detach().clone().requires_grad_() for t in (z, w, u, b)]
    z_k, ladj = planar_chain_ladj(*leaves)
    gen = torch.Generator().manual_seed(5)
    g_z, g_l = (torch.randn(t.shape, generator=gen, dtype=torch.float64).to(z.dtype) for t in (z_k, ladj))
    grads = torch.autograd.grad((z_k * g_z).sum() + (ladj * g_l).sum(), leaves)
    with torch.no_grad():
        z_ng, ladj_ng = planar_chain_ladj(z, w, u, b)  # the no-gradient path
    return (z_k.detach(), ladj.detach(), z_ng, ladj_ng, *grads)


def _inputs(z_shape, batch, k, d, dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *s: torch.randn(*s, generator=gen, dtype=dtype) * scale  # noqa: E731
    return draw(*z_shape, d), draw(*batch, k, d), draw(*batch, k, d), draw(*batch, k)


@needs_kernels
@pytest.mark.parametrize(
    "z_shape, batch",
    [((6,), (6,)), ((3, 5), (5,)), ((4,), ()), ((2, 3), (2, 3)), ((5,), (1,))],
    ids=["amortized", "samples", "global", "two-batch-axes", "broadcast-batch"],
)
def test_the_compiled_planar_chain_gives_the_torch_paths_numbers_in_float64(z_shape, batch, monkeypatch):
    """Values, the no-gradient path and every input's gradient, kernels on against off (float64: to 1e-12),
    over sample axes, batch axes, global parameters and a batch axis that broadcasts."""
    args = _inputs(z_shape, batch, 7, 5, torch.float64, scale=0.8)
    compiled, plain = (_chain(*args, flag, monkeypatch) for flag in (True, False))
    for got, want in zip(compiled, plain, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_kernels
def test_the_compiled_planar_chain_is_float32_to_rounding(monkeypatch):
    """Float32 through the kernel against float64 through torch: float32 rounding (a 10-layer chain)."""
    args = _inputs((50,), (50,), 10, 8, torch.float64, scale=0.7, seed=1)
    want = _chain(*args, False, monkeypatch)
    got = _chain(*(t.float() for t in args), True, monkeypatch)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5)


@needs_kernels
def test_the_compiled_planar_chain_is_exact_at_the_edges(monkeypatch):
    """a = 0 exactly, |a| large enough that sech^2 underflows float32, w.u far below zero (softplus underflows)
    and far above, a tiny a with a tiny softplus (the log-space branch). In float64 the kernel and torch agree;
    in float32 every output of the kernel is as close to the float64 numbers as torch's float32 path, or within
    1e-6 of them relatively (the kernel computes each layer in double: at w.u = -30 its gradient of w is 5e-7
    off, torch's float32 path 2e-5)."""
    d, k = 3, 1
    w = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=torch.float64).expand(6, k, d).clone()
    z = torch.zeros(6, d, dtype=torch.float64)
    z[:, 0] = torch.tensor([0.0, 60.0, -3.0, 0.5, 1e-30, 2.0])
    b = torch.zeros(6, k, dtype=torch.float64)
    wu = torch.tensor([0.3, 2.0, -80.0, 90.0, -800.0, -30.0], dtype=torch.float64)
    u = (wu.view(6, 1, 1) * w).clone()  # w.u = wu (|w| = 1)
    exact = _chain(z, w, u, b, False, monkeypatch)
    for got, want in zip(_chain(z, w, u, b, True, monkeypatch), exact, strict=True):
        assert torch.isfinite(got).all(), got
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-15)
    single = [t.float() for t in (z, w, u, b)]
    compiled, plain = (_chain(*single, flag, monkeypatch) for flag in (True, False))
    for got, torch_f32, want in zip(compiled, plain, exact, strict=True):
        assert torch.isfinite(got).all(), got
        tolerance = torch.maximum((torch_f32.double() - want).abs(), 1e-6 * want.abs()) + 1e-38
        assert ((got.double() - want).abs() <= tolerance).all(), (got, want)


@needs_kernels
def test_the_compiled_planar_chain_passes_gradcheck():
    """torch.autograd.gradcheck through the kernel's forward and hand-written backward (float64)."""
    z, w, u, b = (t.requires_grad_() for t in _inputs((2, 3), (3,), 4, 3, torch.float64, scale=0.9, seed=2))
    assert torch.autograd.gradcheck(lambda *t: planar_chain_ladj(*t), (z, w, u, b))
    assert torch.autograd.gradgradcheck(lambda *t: planar_chain_ladj(*t), (z, w, u, b))  # double backward: torch


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("window", [4, 3, 10])
def test_the_compiled_maxout_is_amax_with_its_gradient(dtype, window):
    """window_max equals amax over windows exactly, with amax's gradient: shared among ties, NaN through a window
    holding NaN; also on a non-contiguous input and three axes."""
    x = torch.randn(5, 2, 8 * window, dtype=dtype)
    x[0, 0, :window] = 1.5  # a tie over a whole window
    x[1, 1, window + 1] = float("nan")
    x = x.transpose(0, 1).requires_grad_()  # non-contiguous
    g = torch.randn(2, 5, 8, dtype=dtype)
    got, want = window_max(x, window), _window_amax(x, window)
    (g_got,), (g_want,) = torch.autograd.grad(got, x, g), torch.autograd.grad(want, x, g)
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    assert torch.equal(g_got.nan_to_num(7.0), g_want.nan_to_num(7.0))
    assert g_got[0, 0, :window].eq(g[0, 0, 0] / window).all()


@needs_kernels
def test_the_compiled_maxout_passes_gradcheck_and_double_backward():
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: window_max(t, 4), (x,))
    assert torch.autograd.gradgradcheck(lambda t: window_max(t, 4), (x,))


def test_nfvi_kernels_takes_0_or_1(monkeypatch):
    monkeypatch.setenv("NFVI_KERNELS", "0")
    assert kernels.enabled() is False and not kernels.supports(torch.zeros(1))
    monkeypatch.setenv("NFVI_KERNELS", "yes")
    with pytest.raises(NfviError, match=r"^NFVI_KERNELS='yes': use 1 \(compiled CPU kernels, the default\) or 0"):
        kernels.enabled()


def test_other_dtypes_and_devices_take_the_torch_path():
    assert not kernels.supports(torch.zeros(2, dtype=torch.bfloat16))
    assert not kernels.supports(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert not kernels.supports(torch.zeros(2, device="meta"))


def test_without_a_compiler_a_warning_and_torchs_numbers(monkeypatch, tmp_path, caplog):
    """No C compiler (or one that fails): one warning naming the reason, load() is None, and the chain and maxout
    still run (torch operations)."""
    monkeypatch.setenv("NFVI_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    kernels.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="nfvi.kernels"):
            assert kernels.load() is None
            z_k, ladj = planar_chain_ladj(*_inputs((4,), (4,), 3, 2, torch.float32))
            out = window_max(torch.randn(2, 8), 4)
        assert "no C compiler" in caplog.text and torch.isfinite(ladj).all() and out.shape == (2, 2)
        assert list(tmp_path.iterdir()) == []
    finally:
        kernels.load.cache_clear()


def test_a_failing_compiler_leaves_no_file_and_warns(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("NFVI_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_compiler", lambda: "/bin/false")
    kernels.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="nfvi.kernels"):
            assert kernels.load() is None
        assert "torch operations run instead" in caplog.text
        assert list(tmp_path.iterdir()) == []  # the temporary file is gone; nothing half-written stays
    finally:
        kernels.load.cache_clear()


@needs_kernels
def test_the_library_is_built_once_into_the_cache_named_by_its_hash(monkeypatch, tmp_path):
    monkeypatch.setenv("NFVI_KERNEL_CACHE", str(tmp_path / "cache"))
    kernels.load.cache_clear()
    try:
        assert kernels.load() is not None
        (built,) = (tmp_path / "cache").iterdir()
        assert built.name.startswith("nfvi-") and built.suffix == ".so"
        stamp = built.stat().st_mtime_ns
        kernels.load.cache_clear()
        assert kernels.load() is not None and built.stat().st_mtime_ns == stamp  # reused, not rebuilt
    finally:
        kernels.load.cache_clear()


def _rmsprop_pair(momentum: float, weight_decay: float, dtype=torch.float32, **extra):
    gen = torch.Generator().manual_seed(3)
    shapes = [(37, 5), (101,), (3, 4, 6)]
    ours = [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = {"lr": 1e-3, "momentum": momentum, "weight_decay": weight_decay, "eps": 1e-8, **extra}
    return ours, theirs, torch.optim.RMSprop(ours, **kwargs), torch.optim.RMSprop(theirs, **kwargs)


@needs_kernels
@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 0.0), (0.0, 0.1), (0.5, 1e-3)])
def test_step_with_norm_is_torchs_rmsprop_step_and_its_gradient_norm(momentum, weight_decay, one_thread):
    """30 steps through the kernel against clip_gradients(inf) + torch's RMSprop.step: the same norms, parameters
    and state (step, square_avg, momentum_buffer) to float32 rounding, and a state_dict with torch's keys."""
    from nfvi.training import _fused_rmsprop_work, clip_gradients, step_with_norm

    ours, theirs, opt, ref = _rmsprop_pair(momentum, weight_decay)
    gen = torch.Generator().manual_seed(4)
    for _ in range(30):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        assert _fused_rmsprop_work(opt, ours) is not None  # the kernel's path, not the fallback
        norm = step_with_norm(opt, ours)
        want = clip_gradients(theirs, float("inf"))
        ref.step()
        torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in ref.state[q]:
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-5, atol=1e-5)  # buf: O(10)
    assert opt.state_dict()["state"][0].keys() == ref.state_dict()["state"][0].keys()


def test_step_with_norm_falls_back_to_torchs_step_where_the_kernel_cannot(monkeypatch, one_thread):
    """Centered RMSprop, Adam, a step hook, a parameter list that is not the optimizer's, float16 and
    NFVI_KERNELS=0 take clip_gradients + optimizer.step(): the same numbers as calling those."""
    from nfvi.training import _fused_rmsprop_work, clip_gradients, step_with_norm

    cases = [
        _rmsprop_pair(0.9, 0.0, centered=True)[::2],
        (lambda p: (p, torch.optim.Adam(p, lr=1e-3)))([torch.nn.Parameter(torch.randn(7))]),
        _rmsprop_pair(0.0, 0.0, dtype=torch.float16)[::2],
    ]
    hooked = _rmsprop_pair(0.9, 0.0)[::2]
    hooked[1].register_step_post_hook(lambda *a: None)
    cases.append(hooked)
    for params, opt in cases:
        for p in params:
            p.grad = torch.ones_like(p)
        assert _fused_rmsprop_work(opt, params) is None
        before = [p.detach().clone() for p in params]
        norm = step_with_norm(opt, iter(params))  # any iterable, as torch's optimizers take
        assert float(norm) == pytest.approx(float(clip_gradients(params, float("inf"))), rel=1e-3)
        assert any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))  # stepped
    params, opt = _rmsprop_pair(0.9, 0.0)[::2]
    for p in params:
        p.grad = torch.ones_like(p)
    assert _fused_rmsprop_work(opt, params[:1]) is None  # params not the optimizer's: the norm would differ
    torch.set_num_threads(2)
    assert _fused_rmsprop_work(opt, params) is None  # the kernel is one thread; torch's step uses them all
    torch.set_num_threads(1)
    monkeypatch.setenv("NFVI_KERNELS", "0")
    assert _fused_rmsprop_work(opt, params) is None


@needs_kernels
@pytest.mark.parametrize("w_floor", [None, 0.1])
@pytest.mark.parametrize(
    "z_shape, batch", [((6,), (6,)), ((3, 5), (5,)), ((4,), ())], ids=["amortized", "samples", "global"]
)
def test_the_packed_planar_chain_gives_the_split_chains_numbers(w_floor, z_shape, batch, monkeypatch):
    """planar_chain_packed (one node over PlanarFlow's raw [u, w', b], floor included, the raw gradient written
    whole) against planar_split + planar_chain_ladj through torch's ops, float64: values and gradients to 1e-12."""
    from nfvi.transforms import planar_chain_packed, planar_split

    gen = torch.Generator().manual_seed(6)
    d, k = 4, 5
    z = torch.randn(*z_shape, d, generator=gen, dtype=torch.float64)
    raw = torch.randn(*batch, k, 2 * d + 1, generator=gen, dtype=torch.float64) * 0.8
    g = torch.Generator().manual_seed(7)
    results = []
    for packed in (True, False):
        monkeypatch.setenv("NFVI_KERNELS", "1" if packed else "0")
        zl, rl = z.clone().requires_grad_(), raw.clone().requires_grad_()
        if packed:
            z_k, ladj = planar_chain_packed(zl, rl, w_floor)
        else:
            u, w, b = planar_split(rl, w_floor)
            z_k, ladj = planar_chain_ladj(zl, w, u, b)
        g.manual_seed(7)
        loss = (z_k * torch.randn(z_k.shape, generator=g, dtype=z.dtype)).sum() + (
            ladj * torch.randn(ladj.shape, generator=g, dtype=z.dtype)
        ).sum()
        results.append((z_k.detach(), ladj.detach(), *torch.autograd.grad(loss, (zl, rl))))
        with torch.no_grad():
            results[-1] += planar_chain_packed(z, raw, w_floor) if packed else ()
    for got, want in zip(results[0], results[1], strict=False):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][4], results[1][0], rtol=1e-12, atol=1e-12)  # no-gradient path too


@needs_kernels
def test_the_packed_planar_chain_passes_gradcheck_with_the_floor():
    from nfvi.transforms import planar_chain_packed

    z = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    raw = (torch.randn(3, 4, 7, dtype=torch.float64) * 0.7).requires_grad_()
    assert torch.autograd.gradcheck(lambda z, r: planar_chain_packed(z, r, 0.1), (z, raw))
    assert torch.autograd.gradgradcheck(lambda z, r: planar_chain_packed(z, r, 0.1), (z, raw))
