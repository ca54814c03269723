"""nfvi.training.LossWindow: the same means read at once (CPU) or deferred (device sums), and the deferred guard."""

from __future__ import annotations

import math

import pytest
import torch

from nfvi.errors import NonFiniteLossError
from nfvi.training import LossWindow
from tests.conftest import needs_cxx


def _window(defer):
    return LossWindow(("loss", "gn"), "cpu", labels={"loss": "the loss"}, maximum=("gn",), defer=defer, where="kept")


def test_deferred_and_immediate_windows_read_the_same_means():
    values = [(torch.tensor(v, dtype=torch.float32), torch.tensor(g)) for v, g in ((1.5, 3.0), (2.25, 7.0), (4.0, 1.0))]
    reads = []
    for defer in (False, True):
        w = _window(defer)
        for step, (v, g) in enumerate(values, 1):
            w.add(step, loss=v, gn=g)
        reads.append(w.read())
        assert w.n == 0 and math.isnan(w.read()["loss"])
    assert reads[0] == reads[1] == {"loss": pytest.approx(7.75 / 3), "gn": 7.0}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_deferred_guard_names_the_first_non_finite_update_when_checked(bad):
    w = _window(True)
    w.add(10, loss=torch.tensor(1.0), gn=torch.tensor(1.0))
    w.read()
    for step, (v, g) in enumerate([(1.0, 1.0), (1.0, bad), (bad, 1.0), (1.0, 1.0)], 11):
        w.add(step, loss=torch.tensor(v), gn=torch.tensor(g))  # no error yet: nothing is read
    with pytest.raises(NonFiniteLossError, match=r"^gn became (nan|inf) at step 12; stopping; kept$"):
        w.check()
    w = _window(False)
    with pytest.raises(NonFiniteLossError, match=r"^the loss became (nan|inf) at step 3; stopping; kept$"):
        w.add(3, loss=torch.tensor(bad), gn=torch.tensor(1.0))


# ----------------------------------------------------------------------------------------------- optim.compile
def _twins(name: str, compile_second: bool):
    from nfvi.config import OptimConfig
    from nfvi.training import optimizer_from_config

    out = []
    for compiled in (False, compile_second):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((37, 5), (5,), (300,))]
        cfg = OptimConfig(name=name, lr=1e-2, momentum=0.9, compile=compiled)
        out.append((params, optimizer_from_config(cfg, params)))
    return out


def _same_updates(pairs, steps: int, scheduler=None) -> float:
    """Run both optimizers on the same random gradients, the learning rate changing at every step; return the
    largest difference of their parameters."""
    gen = torch.Generator().manual_seed(1)
    scheds = [scheduler(opt) for _, opt in pairs] if scheduler else None
    for step in range(steps):
        for i in range(len(pairs[0][0])):
            grad = torch.randn(pairs[0][0][i].shape, generator=gen)
            for params, _ in pairs:
                params[i].grad = grad.clone()
        for _, opt in pairs:
            if scheduler is None:
                for group in opt.param_groups:
                    group["lr"] = 1e-2 * (1 - step / steps)
            opt.step()
        for sched in scheds or ():
            sched.step()
    return max(float((a - b).detach().abs().max()) for a, b in zip(pairs[0][0], pairs[1][0], strict=True))


@pytest.mark.parametrize("name", ["rmsprop", "adamax"])
def test_compiled_optimizer_step_matches_the_eager_step_without_recompiling(name, caplog):
    """optim.compile=true: the same parameters as the eager step to float32 rounding after 25 steps whose learning
    rate changes every step, compiled once (the lr goes in as a tensor), and floats left in param_groups."""
    needs_cxx()
    from torch._dynamo.utils import counters

    pairs = _twins(name, compile_second=True)
    graphs = counters["stats"]["unique_graphs"]
    with caplog.at_level("WARNING", logger="nfvi.training"):
        diff = _same_updates(pairs, 25)
    assert diff < 1e-6
    assert not [r for r in caplog.records if r.name == "nfvi.training"]  # compiled (no fallback to eager) ...
    assert counters["stats"]["unique_graphs"] - graphs == 1  # ... once, though the lr changed at every step
    state = pairs[1][1].state_dict()
    assert all(type(g["lr"]) is float for g in state["param_groups"])


def test_compiled_optimizer_step_runs_under_torchs_lr_scheduler():
    """nfvi energy's cosine schedule (torch's CosineAnnealingLR wraps optimizer.step): the same updates."""
    needs_cxx()
    from nfvi.training import cosine_scheduler

    diff = _same_updates(_twins("rmsprop", True), 10, scheduler=lambda opt: cosine_scheduler(opt, 10, 1e-4))
    assert diff < 1e-6


def test_optimizer_step_stays_eager_with_a_warning_where_compiling_fails(monkeypatch, caplog):
    """No C++ compiler (or any failure of the first compiled step): a warning naming the reason, the eager step."""
    import nfvi.training as training

    def broken(fn):
        def call(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

        return call

    monkeypatch.setattr(training.torch, "compile", broken)
    pairs = _twins("rmsprop", compile_second=True)
    with caplog.at_level("WARNING", logger="nfvi.training"):
        diff = _same_updates(pairs, 5)
    assert diff == 0.0  # the eager step itself, from the first update on
    warnings = [r.getMessage() for r in caplog.records if r.name == "nfvi.training"]
    assert len(warnings) == 1 and "optim.compile=true (rmsprop)" in warnings[0]
    assert "No working C++ compiler found" in warnings[0] and "more detail" not in warnings[0]


def test_match_state_layout_gives_old_row_major_state_the_parameters_layout(one_thread):
    """An amortized flow head's weight is column-major; optimizer state saved before that (row-major) is given
    the parameter's layout on load, values unchanged, so step_with_norm's one-pass step takes it again."""
    from nfvi import kernels
    from nfvi.flows import build_flow
    from nfvi.training import _fused_rmsprop_work, match_state_layout

    flow = build_flow("planar", dim=2, length=3, context_dim=5)
    weight = flow.head.weight
    assert weight.shape == (3 * 5, 5) and weight.t().is_contiguous() and not weight.is_contiguous()
    opt = torch.optim.RMSprop(flow.parameters(), lr=1e-3, momentum=0.9)
    for p in flow.parameters():
        p.grad = torch.ones_like(p)
    old = {id(p): {"step": torch.tensor(3.0), "square_avg": torch.rand(p.shape), "momentum_buffer": torch.rand(p.shape)}
           for p in flow.parameters()}  # fmt: skip
    for p in flow.parameters():
        opt.state[p] = {k: v.clone() for k, v in old[id(p)].items()}  # contiguous, as an older checkpoint's
    assert _fused_rmsprop_work(opt, list(flow.parameters())) is None  # the head's state has another layout
    match_state_layout(opt)
    for p in flow.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(value, old[id(p)][key])
            assert value.dim() == 0 or value.stride() == p.stride()
    assert _fused_rmsprop_work(opt, list(flow.parameters())) is not None or kernels.load() is None
