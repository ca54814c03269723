"""Per-data-point ELBO and the importance-sampling estimate of log p(x), in nats.

::

    from nfvi.estimators import elbo, log_marginal_likelihood
    log_px = log_marginal_likelihood(model, x_test, num_samples=5000)   # (N,), chunks of 5,000 samples on a CPU
    nll = -log_px.mean()

The estimator uses ``q_K(z | x)`` itself as the proposal::

    log p(x) ~= logsumexp_s [log p(x, z_K^s) - log q_K(z_K^s | x)] - log S,   z_K^s ~ q_K(. | x)

where ``log q_K`` is computed along each sampling path (paper Eq. 7). For any finite S it is a
stochastic lower bound on log p(x) (Jensen), equal to a one-sample ELBO at S = 1, and it tends to
log p(x) as S grows.

Memory is bounded by ``batch_size``, the number of z-samples drawn from the posterior at once:
with S < batch_size, ``batch_size // S`` data points go together with all their S samples;
otherwise one data point at a time, its samples in chunks of ``batch_size``. On the CPU a chunk
also holds at most :data:`CPU_DECODE_BLOCK` data points, and the decoder (``log_joint``) takes its
samples :data:`CPU_DECODE_BLOCK` at a time, so that the networks' activations stay in cache. Chunks are combined
exactly (``logaddexp`` of the chunks' ``logsumexp``, accumulated in float64). The result is
statistically independent of ``batch_size``; for :class:`nfvi.vae.model.VAE`, which draws its
noise in (data point, sample) order, a fixed seed even gives the same draws, hence the same
numbers up to rounding, on the CPU whenever ``S * D`` and ``batch_size * D`` are multiples of 16
(e.g. D = 40 with even S and even ``batch_size``; see ``VAE.sample_posterior``).

``model`` needs ``posterior(x, S) -> (z (S, B, D), log_q (S, B))`` and ``log_joint(x, z) -> (S, B)``.
Both functions run under ``torch.inference_mode()`` with the model in eval mode (restored after),
move each chunk of ``x`` to the model's device, and return float64 tensors on the CPU. A NaN in
any log-weight propagates to that data point's result (it is not hidden).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from nfvi.checks import check_tensor, shape_str
from nfvi.errors import NfviError, check_range

__all__ = [
    "CPU_DECODE_BLOCK",
    "default_batch_size",
    "elbo",
    "log_marginal_likelihood",
    "log_weights",
    "nats_to_bits_per_dim",
]

#: on the CPU, ``log_joint`` (the decoder and the likelihood) takes at most this many z-samples at a time, and a
#: chunk at most this many data points (the encoder's batch), so that activations stay in cache (the maxout MNIST
#: decoder: about 10 MB) while the posterior draws a whole chunk of samples
CPU_DECODE_BLOCK = 1_000


def default_batch_size(device: torch.device | None) -> int:
    """z-samples per chunk when ``batch_size`` is None: 5,000 on the CPU, 10,000 on a GPU.

    On the CPU the decoder takes a chunk :data:`CPU_DECODE_BLOCK` samples at a time, so a chunk may be large:
    one chunk per image at S=5000 draws the posterior (the encoder and K flow layers) once per image. For the
    maxout MNIST model, 5,000 in blocks of 1,000 ran about 10% faster than 2,000 decoded at once, itself 1.8x
    faster than 10,000 decoded at once (150 MB of activations; ``benchmarks/README.md``).
    """
    return 10_000 if device is not None and device.type == "cuda" else 5_000


def _device(model) -> torch.device | None:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(model, torch.nn.Module):
        for tensor in [*model.parameters(), *model.buffers()]:
            return tensor.device
    return None


@contextlib.contextmanager
def _evaluation(model):
    was_training = getattr(model, "training", None)
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train(True)


def _chunks(
    num_data: int, num_samples: int, batch_size: int, max_points: int | None = None
) -> Iterator[tuple[int, int, list[int]]]:
    """Yield ``(start, stop, sample_chunk_sizes)``; each chunk holds at most ``batch_size`` z-samples (and at most
    ``max_points`` data points)."""
    if num_samples >= batch_size:
        sizes = [batch_size] * (num_samples // batch_size)
        if num_samples % batch_size:
            sizes.append(num_samples % batch_size)
        points = 1
    else:
        sizes, points = [num_samples], batch_size // num_samples
    if max_points:
        points = min(points, max_points)
    for start in range(0, num_data, points):
        yield start, min(start + points, num_data), sizes


def log_weights(model, x: Tensor, num_samples: int, block: int | None = None) -> Tensor:
    """``log p(x, z_K^s) - log q_K(z_K^s | x)`` for ``S = num_samples`` draws: ``(S, B)`` (one chunk).

    ``block``: ``log_joint`` takes at most this many z-samples (samples x data points) at a time (None: all).
    """
    z, log_q = model.posterior(x, num_samples)
    per_block = max(1, block // x.shape[0]) if block else num_samples  # samples of each data point per block
    if per_block >= num_samples:
        return model.log_joint(x, z) - log_q
    return torch.cat([model.log_joint(x, part) for part in z.split(per_block, 0)]) - log_q


class _ProgressLines:
    """Without a bar (stderr is not a terminal): a log line with the images done and the ETA every tenth."""

    def __init__(self, total: int, what: str):
        import logging
        import time

        self.log, self.clock = logging.getLogger("nfvi.evaluate"), time.time
        self.total, self.what, self.t0, self.next = total, what, time.time(), max(1, total // 10)

    def __call__(self, done: int) -> None:
        if done < self.next:
            return
        self.next = done + max(1, self.total // 10)
        elapsed = self.clock() - self.t0
        eta = elapsed / done * (self.total - done)
        self.log.info("%s: %d/%d images done, %.0f s elapsed, ETA %.0f s", self.what, done, self.total, elapsed, eta)


def _check_data(model, x) -> None:
    """One-line errors for data the model cannot read: not a tensor, or points of the wrong size.

    ``model.x_shape`` (a :class:`nfvi.vae.model.VAE` has one) is the shape of one data point; ``x`` may hold the
    points flat or shaped (``(N, 784)`` or ``(N, 1, 28, 28)``), as :meth:`nfvi.vae.model.VAE.prepare` reshapes.
    """
    x_shape = getattr(model, "x_shape", None)
    expected = "(N, *x_shape)" if x_shape is None else f"(N, {', '.join(map(str, x_shape))})"
    check_tensor("x", x, expected)
    if x_shape is not None and (x.dim() < 2 or math.prod(x.shape[1:]) != math.prod(x_shape)):
        raise NfviError(
            f"x has shape {shape_str(x.shape)} but the model takes data points of shape {shape_str(x_shape)} "
            f"({math.prod(x_shape)} values each); expected {expected}"
        )


def _run(model, x, num_samples, batch_size, progress, reduce) -> Tensor:
    check_range("num_samples", num_samples, low=1, kind="a whole number of samples")
    _check_data(model, x)
    device = _device(model)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    check_range("batch_size", batch_size, low=1, kind="a whole number of samples per chunk")
    block = CPU_DECODE_BLOCK if device is None or device.type == "cpu" else None
    chunks = list(_chunks(x.shape[0], num_samples, batch_size, block))
    lines = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(chunks, desc=f"{reduce} S={num_samples}", unit="chunk", disable=None)  # a terminal only
        lines = _ProgressLines(x.shape[0], f"{reduce} S={num_samples}") if bar.disable else None
        chunks = bar
    out = []
    with _evaluation(model):
        for start, stop, sizes in chunks:
            if lines is not None:
                lines(start)
            x_chunk = x[start:stop]
            if device is not None:
                x_chunk = x_chunk.to(device, non_blocking=True)
            acc = None
            for size in sizes:
                lw = log_weights(model, x_chunk, size, block).double()
                part = torch.logsumexp(lw, dim=0) if reduce == "logmeanexp" else lw.sum(0)
                acc = part if acc is None else (torch.logaddexp(acc, part) if reduce == "logmeanexp" else acc + part)
            acc = acc - math.log(num_samples) if reduce == "logmeanexp" else acc / num_samples
            out.append(acc.cpu())
    if not out:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(out)


def elbo(model, x: Tensor, num_samples: int = 1, batch_size: int | None = None, progress: bool = False) -> Tensor:
    """Monte Carlo ELBO per data point, ``(N,)`` nats: the mean over S draws of ``log p(x, z_K) - log q_K(z_K|x)``.

    ``-elbo`` is the paper's bound F(x). Chunking as in :func:`log_marginal_likelihood`.
    """
    return _run(model, x, num_samples, batch_size, progress, "mean")


def log_marginal_likelihood(
    model, x: Tensor, num_samples: int, batch_size: int | None = None, progress: bool = False
) -> Tensor:
    """Importance-sampling estimate of ``log p(x)`` per data point, ``(N,)`` nats (see module docstring).

    Args:
        model: a VAE (or anything with ``posterior`` and ``log_joint``).
        x: ``(N, *x_shape)`` data, on any device.
        num_samples: S, importance samples per data point (paper: 200; Sylvester flows: 5000).
        batch_size: z-samples per chunk (bounds memory); None = :func:`default_batch_size` of the model's device.
        progress: show a tqdm bar over chunks.
    """
    return _run(model, x, num_samples, batch_size, progress, "logmeanexp")


def nats_to_bits_per_dim(nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Convert a negative log-likelihood in nats per data point to bits per dimension."""
    return nats / (num_dims * math.log(2.0))
