"""Hand-written CPU kernels, compiled once per machine from the C sources shipped beside this file.

Three, all on the training update's path (docs/performance.md):

- ``planar.c``: :func:`nfvi.transforms.planar_chain_ladj`'s K layers, log-determinants and hand-written backward
  as one loop per sample, instead of some thirty torch operations over ``(K, B, D)`` buffers;
- ``maxout.c``: the max of :class:`nfvi.vae.model.Maxout` over windows and its backward, one pass each;
- ``rmsprop.c``: torch's RMSprop step with the gradient's squared norm in the same pass
  (:func:`nfvi.training.step_with_norm`).

nfvi stays a pure-Python wheel: the first use compiles the sources with the machine's C compiler (``$CC``, else
``cc``, ``gcc`` or ``clang``; about a second) into ``$XDG_CACHE_HOME/nfvi/kernels`` (``~/.cache/nfvi/kernels``;
``NFVI_KERNEL_CACHE`` overrides), named by a hash of the sources, the compiler, its flags and the CPU, and loads
the library with :mod:`ctypes`. Where that is not possible (no compiler, no writable cache, not Linux or macOS) a
warning names the reason once, and torch operations run instead: the same maths, the same numbers to float32
rounding. Only CPU tensors of float32 or float64 go through the kernels; CUDA, other dtypes, ``torch.func``
transforms and double backward use the torch operations.

``NFVI_KERNELS=0`` turns the kernels off (``1``, the default, on); any other value is a one-line
:class:`~nfvi.errors.NfviError`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from nfvi.errors import NfviError

__all__ = [
    "enabled",
    "load",
    "maxout_backward",
    "maxout_forward",
    "planar_backward",
    "planar_forward",
    "planar_reparam",
    "rmsprop_step",
    "supports",
    "usable",
]

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("maxout.c", "planar.c", "rmsprop.c"))
FLAGS = ("-O3", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu11")
NATIVE = ("-march=native",)  # tried first; dropped where the compiler refuses it
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def enabled() -> bool:
    """``NFVI_KERNELS``: 1 (default) or 0; anything else is a one-line :class:`NfviError`."""
    choice = os.environ.get("NFVI_KERNELS", "").strip()
    if choice not in ("", "0", "1"):
        raise NfviError(f"NFVI_KERNELS={choice!r}: use 1 (compiled CPU kernels, the default) or 0 (torch operations)")
    return choice != "0"


def supports(*tensors: Tensor) -> bool:
    """True where the kernels can take ``tensors``: all on the CPU, all float32 or all float64, kernels on and
    loaded."""
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return False
    if any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return False
    return enabled() and load() is not None


def usable(*tensors: Tensor) -> bool:
    """:func:`supports`, and no ``torch.func`` transform or ``torch.jit.trace`` running (a hand-written autograd
    node over raw pointers has no batching rule or trace)."""
    if torch._C._are_functorch_transforms_active() or torch.jit.is_tracing():
        return False
    return supports(*tensors)


def _cache_dir() -> Path:
    if os.environ.get("NFVI_KERNEL_CACHE"):
        return Path(os.environ["NFVI_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nfvi" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_facts() -> str:
    """What makes a ``-march=native`` build specific to this CPU: its model and feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile(cc: str, out: Path) -> None:
    """Compile :data:`SOURCES` into ``out`` atomically (a temporary file in the same folder, then renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        for extra in (NATIVE, ()):
            cmd = [cc, *FLAGS, *extra, "-o", tmp, *map(str, SOURCES), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, out)
                return
        lines = done.stderr.strip().splitlines()
        first = next((ln for ln in lines if "error" in ln), lines[-1] if lines else f"exit {done.returncode}")
        raise OSError(f"{' '.join(cmd)} failed: {first.strip()}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels (compiled on first use), or None where they cannot be (a warning says why, once)."""
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    cc = _compiler()
    if cc is None:
        log.warning("nfvi.kernels: no C compiler ($CC, cc, gcc, clang); torch operations run instead")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        facts = (*(f.read_text() for f in SOURCES), cc, version, " ".join(FLAGS + NATIVE), _cpu_facts())
        key = hashlib.sha256("\0".join(facts).encode()).hexdigest()[:16]
        path = _cache_dir() / f"nfvi-{platform.machine()}-{key}.so"
        if not path.exists():
            _compile(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("nfvi.kernels: torch operations run instead of the compiled kernels (%s)", err)
        return None
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures (the argument names as in the sources), for each of float32 (``_f32``) and float64."""
    i, p, f, flag = _I64, _PTR, ctypes.c_double, ctypes.c_int
    signatures = {
        # N K D, w (pn pk), u (qn qk), floored floor, w_eff u_hat consts
        "planar_reparam": (None, [i, i, i, p, i, i, p, i, i, flag, f, p, p, p]),
        # N S K D, z0 (z0n z0s), w (pn pk), b (bn bk), u_hat consts, zk (zkn zks), ladj (ln ls), zs terms z
        "planar_forward": (None, [i, i, i, i, p, i, i, p, i, i, p, i, i, p, p, p, i, i, p, i, i, p, p, p]),
        # N S K D, w u (qn qk), u_hat consts zs terms, g_zk (gkn gks), g_ladj (gln gls), g_z0 (gzn gzs),
        # g_w g_u (gn gk), g_b (gbn gbk), gz
        "planar_backward": (None, [i] * 4 + [p, p, i, i] + [p] * 4 + [p, i, i] * 3 + [p, p, i, i, p, i, i, p]),
        "maxout_forward": (None, [i, i, i, p, i, p]),  # rows units window, x xr, out
        "maxout_backward": (None, [i, i, i, p, i, p, p, p]),  # rows units window, x xr, out g_out g_x
        "rmsprop_step": (f, [i, p, p, p, p, f, f, f, f, f]),  # n p g v buf, lr alpha eps weight_decay momentum
    }
    for name, (restype, argtypes) in signatures.items():
        for suffix in ("f32", "f64"):
            fn = getattr(lib, f"{name}_{suffix}")
            fn.restype, fn.argtypes = restype, argtypes


def _suffix(t: Tensor) -> str:
    return "f32" if t.dtype == torch.float32 else "f64"


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


CONSTS = 9  # doubles per layer in planar.c's layer_consts


def _unit_last(t: Tensor) -> Tensor:
    """``t`` with a unit stride along its last axis (a view where it has one)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def planar_reparam(w: Tensor, u: Tensor, w_floor: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Appendix A.1 for ``w``, ``u (N, K, D)`` (any strides): ``(w_eff, u_hat, consts)``, the layers' ``w``
    (``w`` itself, or with ``w_floor`` :class:`nfvi.flows.PlanarFlow`'s floor ``w_1 = w_floor + softplus(w_1)``)
    and ``u_hat``, both ``(N, K, D)`` contiguous, and the per-layer constants ``(N, K, 9)`` float64 (``w.u``,
    ``|w|^2``, ``softplus(+-w.u)``, ``r``, ...) that :func:`planar_forward` and :func:`planar_backward` read."""
    w, u = _unit_last(w), _unit_last(u)
    n, k, d = w.shape
    w_eff, u_hat = torch.empty(n, k, d, dtype=w.dtype), torch.empty(n, k, d, dtype=w.dtype)
    consts = torch.empty(n, k, CONSTS, dtype=torch.float64)
    floored, floor = w_floor is not None, float(w_floor or 0.0)
    fn = getattr(load(), f"planar_reparam_{_suffix(w)}")
    fn(n, k, d, _ptr(w), *w.stride()[:2], _ptr(u), *u.stride()[:2], floored, floor, _ptr(w_eff), _ptr(u_hat),
       _ptr(consts))  # fmt: skip
    return w_eff, u_hat, consts


def planar_forward(
    z0: Tensor, w: Tensor, b: Tensor, u_hat: Tensor, consts: Tensor, keep: bool
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """K planar layers (Eq. 10) and their summed log-determinants (Eq. 11-12), compiled.

    ``z0 (N, S, D)``, ``w (N, K, D)`` (:func:`planar_reparam`'s ``w_eff``) and ``b (N, K)`` with any strides
    (views of a parameter head's output are read in place), ``u_hat`` and ``consts`` from :func:`planar_reparam`.
    Returns ``z_K (N, S, D)`` (in an ``(S, N, D)`` buffer), ``ladj (N, S)`` (in ``(S, N)``) and, with ``keep``,
    what :func:`planar_backward` reads: every layer's input ``zs (N, S, K, D)`` and its ``tanh a``, ``sech^2 a``
    and the log-determinant's derivatives, ``terms (N, S, K, 4)`` float64.
    """
    n, s, d = z0.shape
    k = w.shape[1]
    z0, w = _unit_last(z0), _unit_last(w)
    z_k = torch.empty(s, n, d, dtype=z0.dtype).transpose(0, 1)
    ladj = torch.empty(s, n, dtype=z0.dtype).T
    zs = torch.empty(n, s, k, d, dtype=z0.dtype) if keep else None
    terms = torch.empty(n, s, k, 4, dtype=torch.float64) if keep else None
    scratch = torch.empty(d, dtype=z0.dtype)
    fn = getattr(load(), f"planar_forward_{_suffix(z0)}")
    fn(n, s, k, d, _ptr(z0), *z0.stride()[:2], _ptr(w), *w.stride()[:2], _ptr(b), *b.stride(), _ptr(u_hat),
       _ptr(consts), _ptr(z_k), *z_k.stride()[:2], _ptr(ladj), *ladj.stride(), _ptr(zs), _ptr(terms),
       _ptr(scratch))  # fmt: skip
    return z_k, ladj, (zs, terms) if keep else None


def planar_backward(
    w_eff: Tensor,
    u: Tensor,
    u_hat: Tensor,
    consts: Tensor,
    saved: tuple[Tensor, Tensor],
    g_zk: Tensor | None,
    g_ladj: Tensor | None,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`planar_forward` (``g_zk (N, S, D)``, ``g_ladj (N, S)``, either None for zero) with
    respect to ``z0 (N, S, D)`` (in an ``(S, N, D)`` buffer), the raw ``w`` (through the floor, if any) and ``u``
    ``(N, K, D)`` and ``b (N, K)``: ``(g_z0, g_w, g_u, g_b)``. ``saved``: the forward's ``(zs, terms)``; ``out``:
    where to write ``(g_w, g_u, g_b)`` (views into one raw parameter's gradient, ``g_w`` and ``g_u`` with the same
    strides and unit last stride), else new contiguous tensors."""
    zs, terms = saved
    n, s, k, d = zs.shape
    u = _unit_last(u)
    g_zk = None if g_zk is None else _unit_last(g_zk)
    g_z0 = torch.empty(s, n, d, dtype=zs.dtype).transpose(0, 1)
    if out is None:
        out = torch.empty(n, k, d, dtype=zs.dtype), torch.empty(n, k, d, dtype=zs.dtype), zs.new_empty(n, k)
    g_w, g_u, g_b = out
    gk_strides = g_zk.stride()[:2] if g_zk is not None else (0, 0)
    gl_strides = g_ladj.stride() if g_ladj is not None else (0, 0)
    scratch = torch.empty(d + 2 * k * (d + 1), dtype=torch.float64)
    fn = getattr(load(), f"planar_backward_{_suffix(zs)}")
    fn(n, s, k, d, _ptr(w_eff), _ptr(u), *u.stride()[:2], _ptr(u_hat), _ptr(consts), _ptr(zs), _ptr(terms),
       _ptr(g_zk), *gk_strides, _ptr(g_ladj), *gl_strides, _ptr(g_z0), *g_z0.stride()[:2], _ptr(g_w), _ptr(g_u),
       *g_w.stride()[:2], _ptr(g_b), *g_b.stride(), _ptr(scratch))  # fmt: skip
    return g_z0, g_w, g_u, g_b


def _rows(x: Tensor, width: int) -> Tensor:
    """``x (*, width)`` as ``(rows, width)`` rows with a unit stride (a view where it can be)."""
    x = _unit_last(x)
    return x.reshape(-1, width) if x.dim() != 2 else x


def maxout_forward(x: Tensor, window: int) -> Tensor:
    """``x (*, units * window)`` -> ``(*, units)``: the max over each window of ``window`` consecutive values
    (``x.unflatten(-1, (-1, window)).amax(-1)``), compiled."""
    units = x.shape[-1] // window
    rows = _rows(x, x.shape[-1])
    out = torch.empty(*x.shape[:-1], units, dtype=x.dtype)
    fn = getattr(load(), f"maxout_forward_{_suffix(x)}")
    fn(rows.shape[0], units, window, _ptr(rows), rows.stride(0), _ptr(out))
    return out


def maxout_backward(x: Tensor, out: Tensor, g_out: Tensor, window: int) -> Tensor:
    """The gradient of :func:`maxout_forward` with respect to ``x``, as torch's ``amax`` (shared equally among
    ties): ``x (*, units * window)``, its ``out`` and ``g_out (*, units)``."""
    units = out.shape[-1]
    rows = _rows(x, x.shape[-1])
    g_out = g_out.contiguous()
    g_x = torch.empty(*x.shape[:-1], units * window, dtype=x.dtype)
    fn = getattr(load(), f"maxout_backward_{_suffix(x)}")
    fn(rows.shape[0], units, window, _ptr(rows), rows.stride(0), _ptr(out), _ptr(g_out), _ptr(g_x))
    return g_x


def rmsprop_step(
    p: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    momentum_buffer: Tensor | None,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
) -> float:
    """One torch RMSprop step (not centered, not maximize) of ``p`` in place, with its state; returns the sum of
    the squared gradient (before weight decay). All tensors contiguous, on the CPU, of ``p``'s dtype."""
    fn = getattr(load(), f"rmsprop_step_{_suffix(p)}")
    buf = _ptr(momentum_buffer) if momentum > 0 else None
    return fn(p.numel(), _ptr(p), _ptr(grad), _ptr(square_avg), buf, lr, alpha, eps, weight_decay, momentum)
