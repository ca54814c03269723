"""nfvi.training.LossWindow: the same means read at once (CPU) or deferred (device sums), and the deferred guard."""

from __future__ import annotations

import math

import pytest
import torch

from nfvi.errors import NonFiniteLossError
from nfvi.training import LossWindow


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
