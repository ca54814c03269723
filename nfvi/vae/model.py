"""The DLGM / VAE of paper Sec. 6.2: encoder, diagonal-Gaussian q_0, amortized flow, decoder.

::

    model = build_model(ModelConfig(), FlowConfig(kind="planar", length=10), x_dim=784)
    z_k, log_qk = model.posterior(x, num_samples=5)     # (S, B, D), (S, B)
    log_pxz = model.log_joint(x, z_k)                  # (S, B): log p(x | z_K) + log p(z_K)

Architecture (``model=maxout``, the paper's): one hidden layer of 400 maxout units over windows of
4 (a ``Linear`` to 400*4, then the max over each window) in the encoder and in the decoder, 40
latent variables and a Bernoulli likelihood on logits. The encoder's hidden features ``h`` (B, H)
feed the Gaussian head ``(mu, sigma)`` *and* the flow's fused parameter head (the amortization of
paper Sec. 4.3 / 6.2), so each data point gets its own ``u_k, w_k, b_k``.

Parts are chosen by name so other data fit in: ``model.name`` picks an *architecture* (a function
returning an encoder ``x (B, *x_shape) -> h (B, H)`` with an ``out_dim``, and a decoder
``z (*, D) -> params (*, P*x_shape[0], *x_shape[1:])``), and ``model.likelihood`` picks the distribution of
x built from the decoder's output (:mod:`nfvi.vae.likelihoods`: ``bernoulli``, and for 8-bit images
``discretized_logistic`` and ``logit_normal``; ``P`` is the likelihood's number of parameters per value).
Register a new architecture with :func:`register_architecture`; ``model=conv`` (:mod:`nfvi.vae.conv`)
is the convolutional one for image-shaped data, ``model=gated_conv`` (:mod:`nfvi.vae.gated_conv`) the
Sylvester-flows paper's gated convnet for binary 1x28x28 images. :func:`model_input_shape` says which ``x_dim`` an
architecture takes (flat for the MLPs, ``(C, H, W)`` for conv), and uint8 inputs are 8-bit images read
as ``k / 255`` (:meth:`VAE.prepare`).

Choice for q_0's scale: ``sigma = softplus(raw) + model.min_scale``. Softplus grows linearly (no
``exp`` overflow for large raw values) and the floor keeps ``log sigma`` (and so ``log q_0``)
bounded, the two ways an ``exp(log_sigma)`` head can produce inf/NaN early in training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from nfvi import kernels
from nfvi.config import MAX_WIDTH, FlowConfig, store
from nfvi.errors import NfviError, check_choice, check_int_range, check_range
from nfvi.flows import Flow
from nfvi.training import flow_from_config
from nfvi.transforms import _plain, _recompute_grads
from nfvi.vae.conv import conv_architecture
from nfvi.vae.gated_conv import GATE_INITS, gated_conv_architecture
from nfvi.vae.likelihoods import SPECS

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "IMAGE_ARCHITECTURES",
    "LIKELIHOODS",
    "Maxout",
    "ModelConfig",
    "PosteriorSample",
    "VAE",
    "build_model",
    "check_likelihood_fits",
    "model_input_shape",
    "register_architecture",
]

ACTIVATIONS = ("maxout", "tanh", "relu")
LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class ModelConfig:
    """``model=maxout`` (the paper's) or ``model=mlp``; the keys every architecture reads."""

    name: str = "maxout"  # architecture: maxout | mlp | conv | gated_conv
    latent_dim: int = 40  # D, the number of latent variables
    hidden: int = 400  # units per hidden layer (maxout: units after the max)
    maxout_window: int = 4  # maxout: pieces per unit (paper: windows of 4)
    activation: str = "maxout"  # maxout | tanh | relu (conv: tanh | relu)
    layers: int = 1  # hidden layers in the encoder and in the decoder (paper: 1)
    likelihood: str = "bernoulli"  # bernoulli (binary data) | discretized_logistic | logit_normal (8-bit data)
    min_scale: float = 1e-4  # q_0: sigma = softplus(raw) + min_scale
    channels: int = 32  # conv only: channels of the first conv stage (doubled at each downsampling)
    init: str = "torch"  # gated_conv only: torch (PyTorch's, as the Sylvester code) | unit_variance (LSUV)

    def __post_init__(self):
        check_choice("model", self.name, ARCHITECTURES)
        check_choice("model.activation", self.activation, ACTIVATIONS)
        if self.name == "maxout" and self.activation != "maxout":
            raise NfviError(f"model=maxout needs model.activation=maxout, got {self.activation!r}; use model=mlp")
        if self.name in IMAGE_ARCHITECTURES and self.activation == "maxout":
            raise NfviError(f"model={self.name} has no maxout layers; use model.activation=relu or tanh")
        check_choice("model.likelihood", self.likelihood, LIKELIHOODS)
        check_choice("model.init", self.init, GATE_INITS)
        if self.init != "torch" and self.name != "gated_conv":
            raise NfviError(f"model.init={self.init} is for model=gated_conv only (model={self.name}); use torch")
        for key, high in (("latent_dim", 4096), ("hidden", MAX_WIDTH), ("maxout_window", 64), ("layers", 64)):
            check_int_range(f"model.{key}", getattr(self, key), 1, high, kind="a whole number")
        check_int_range("model.channels", self.channels, 1, 4096, kind="a whole number")
        check_range("model.min_scale", self.min_scale, 0.0, 100.0, kind="a non-negative number")


store("base_model", ModelConfig, group="model")


class _WindowMax(torch.autograd.Function):
    """The max over consecutive windows of the last axis through the compiled kernel (:mod:`nfvi.kernels`), with
    ``amax``'s gradient (shared equally among ties). Under ``create_graph=True`` the backward differentiates
    ``amax`` itself, so higher derivatives are exact."""

    @staticmethod
    def forward(ctx, x: Tensor, window: int) -> Tensor:
        out = kernels.maxout_forward(x, window)
        ctx.save_for_backward(x, out)
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, g_out: Tensor):
        x, out = ctx.saved_tensors
        if torch.is_grad_enabled():
            return *_recompute_grads(lambda t: _window_amax(t, ctx.window), (x,), (g_out,)), None
        return kernels.maxout_backward(x, out, g_out, ctx.window), None


def _window_amax(x: Tensor, window: int) -> Tensor:
    return x.unflatten(-1, (-1, window)).amax(-1)


def window_max(x: Tensor, window: int) -> Tensor:
    """``x (*, units * window) -> (*, units)``: the max over consecutive windows of ``window`` values (maxout),
    as ``x.unflatten(-1, (-1, window)).amax(-1)``, through the compiled kernel where it can (CPU float32 or
    float64, outside ``torch.func``): one pass forward and one backward, against four to six for ``amax``."""
    if kernels.usable(x):
        return _WindowMax.apply(x, window)
    return _window_amax(x, window)


class Maxout(nn.Module):
    """``out`` maxout units: ``Linear(n_in, out * window)``, then the max over consecutive windows.

    Speed: on the CPU (float32 or float64) the max and its backward run in the compiled kernel
    (:func:`window_max`, one pass each). Without it, with many rows (more than twice ``n_in``, e.g. the decoder in
    importance sampling), the product is taken with the weight's rows reordered piece-major (a copy of the small
    weight), so that ``amax`` runs over ``window`` contiguous blocks of ``out`` values instead of ``out`` windows of
    ``window`` (3-4x faster). The same units and parameters; the max is exact, so only the product's rounding can
    differ.
    """

    def __init__(self, n_in: int, n_out: int, window: int):
        super().__init__()
        self.window = window
        self.linear = nn.Linear(n_in, n_out * window)

    def forward(self, x: Tensor) -> Tensor:
        n_in = x.shape[-1]
        if x.numel() > 2 * n_in * n_in and not kernels.usable(x):  # rows > 2 n_in, and no compiled window max
            w = self.linear.weight.view(-1, self.window, n_in).transpose(0, 1).reshape(-1, n_in)
            b = self.linear.bias.view(-1, self.window).T.reshape(-1)
            return F.linear(x, w, b).unflatten(-1, (self.window, -1)).amax(-2)
        return window_max(self.linear(x), self.window)


def _hidden_layer(n_in: int, cfg) -> nn.Module:
    if cfg.activation == "maxout":
        return Maxout(n_in, cfg.hidden, cfg.maxout_window)
    return nn.Sequential(nn.Linear(n_in, cfg.hidden), nn.Tanh() if cfg.activation == "tanh" else nn.ReLU())


class MLPEncoder(nn.Module):
    """``x (B, *x_shape) -> h (B, hidden)``: flatten, then ``layers`` hidden layers."""

    def __init__(self, x_shape: tuple[int, ...], cfg):
        super().__init__()
        n_in = math.prod(x_shape)
        self.net = nn.Sequential(*[_hidden_layer(n_in if i == 0 else cfg.hidden, cfg) for i in range(cfg.layers)])
        self.out_dim = cfg.hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class MLPDecoder(nn.Module):
    """``z (*, D) -> params (*, P*x_shape[0], *x_shape[1:])``: ``layers`` hidden layers, then a linear output.

    ``P`` is the likelihood's number of parameters per value (1 for Bernoulli logits).
    """

    def __init__(self, x_shape: tuple[int, ...], cfg):
        super().__init__()
        num = SPECS[cfg.likelihood].num_params if cfg.likelihood in SPECS else 1
        self.x_shape = (num * x_shape[0], *x_shape[1:])
        layers = [_hidden_layer(cfg.latent_dim if i == 0 else cfg.hidden, cfg) for i in range(cfg.layers)]
        self.net = nn.Sequential(*layers, nn.Linear(cfg.hidden, math.prod(self.x_shape)))

    @property
    def output_bias(self) -> Tensor:
        return self.net[-1].bias

    def forward(self, z: Tensor) -> Tensor:
        out = self.net(z)
        return out if len(self.x_shape) == 1 else out.unflatten(-1, self.x_shape)


#: name -> builder(x_shape, model_cfg) -> (encoder, decoder); see the module docstring for the contract.
ARCHITECTURES: dict[str, Callable[[tuple[int, ...], object], tuple[nn.Module, nn.Module]]] = {}
#: architectures that take image-shaped data ``(C, H, W)`` rather than flat vectors
IMAGE_ARCHITECTURES: set[str] = set()


def register_architecture(name: str, images: bool = False):
    """Decorator: make ``model.name=<name>`` build ``(encoder, decoder)`` with the decorated function.

    ``images=True``: the builder wants ``x_shape = (C, H, W)`` (see :func:`model_input_shape`).
    """

    def wrap(builder):
        ARCHITECTURES[name] = builder
        if images:
            IMAGE_ARCHITECTURES.add(name)
        return builder

    return wrap


register_architecture("conv", images=True)(conv_architecture)
register_architecture("gated_conv", images=True)(gated_conv_architecture)


def model_input_shape(model_cfg, image_shape: tuple[int, ...]) -> int | tuple[int, ...]:
    """The ``x_dim`` to pass to :func:`build_model` for data of ``image_shape``.

    Flat size (e.g. 784) for the MLP architectures, as before; the shape ``(C, H, W)`` for image
    architectures (``model=conv``). The data can stay flat: :meth:`VAE.prepare` reshapes.
    """
    shape = tuple(int(n) for n in image_shape)
    return shape if model_cfg.name in IMAGE_ARCHITECTURES else math.prod(shape)


def check_likelihood_fits(likelihood: str, data_kind: str, dataset: str = "") -> None:
    """One-line :class:`NfviError` unless ``model.likelihood`` models data of ``data_kind`` (binary | 8bit)."""
    check_choice("model.likelihood", likelihood, LIKELIHOODS)
    if SPECS[likelihood].data_kind != data_kind:
        fits = ", ".join(n for n, s in SPECS.items() if s.data_kind == data_kind)
        where = f"dataset={dataset} holds" if dataset else "the data are"
        raise NfviError(
            f"model.likelihood={likelihood} is for {SPECS[likelihood].data_kind} data but {where} "
            f"{data_kind} images; use model.likelihood={fits.split(', ')[0]} (choices for {data_kind} data: {fits})"
        )


@register_architecture("maxout")
@register_architecture("mlp")
def _mlp_architecture(x_shape, cfg):
    return MLPEncoder(x_shape, cfg), MLPDecoder(x_shape, cfg)


#: name -> (decoder output (*, P*x_shape[0], *x_shape[1:]), number of event dims) -> distribution over x.
LIKELIHOODS: dict[str, Callable[[Tensor, int], Distribution]] = {name: spec.make for name, spec in SPECS.items()}


class PosteriorSample(NamedTuple):
    """One pass z_0 -> z_K: shapes ``(S, B, D)`` for z and ``(S, B)`` for the log terms."""

    z_0: Tensor
    z_k: Tensor
    log_q0: Tensor  # log q_0(z_0 | x)
    log_det: Tensor  # sum_k log|det df_k/dz_{k-1}|, so log q_K(z_K | x) = log_q0 - log_det


SOFTPLUS_LINEAR_ABOVE = 36.0  # softplus(l) = l to float64 rounding above this (e^-36 < 3e-16, below half l's ulp)


def _softplus_terms(logits: Tensor) -> Tensor:
    """``softplus(l)`` elementwise as ``log(1 + exp(l))``, and ``l`` itself above :data:`SOFTPLUS_LINEAR_ABOVE`
    (where the two agree to rounding, so ``exp`` never overflows): three vectorised passes, where torch's softplus
    kernel is a scalar loop on the CPU (0.75 ms against 0.15 ms for (100, 784) logits). Each term within half an ulp
    of 1 of softplus (for very negative ``l``, ``1 + e^l`` rounds to 1), and no host synchronisation. float32 and
    float64 (``exp`` of 36 is finite in both)."""
    return torch.where(logits > SOFTPLUS_LINEAR_ABOVE, logits, torch.exp(logits).add_(1.0).log_())


class _SumSoftplus(torch.autograd.Function):
    """``softplus(logits).sum(-1)`` as one autograd node: the forward as :func:`_softplus_terms`, the backward
    ``g sigmoid(l)`` (one vectorised pass; torch's softplus backward is another scalar loop). Twice differentiable:
    the backward is plain torch ops on the saved logits."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        ctx.save_for_backward(logits)
        return _softplus_terms(logits).sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (logits,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * torch.sigmoid(logits)


def _sum_softplus(logits: Tensor) -> Tensor:
    """``softplus(logits).sum(-1)`` (the Bernoulli log-normaliser), shape ``logits.shape[:-1]``, by
    :class:`_SumSoftplus` (without gradients it only runs its forward). Inside a ``torch.func`` transform, and for
    other dtypes, torch's own softplus (same values to rounding)."""
    if _plain() or logits.dtype not in (torch.float32, torch.float64):
        return F.softplus(logits).sum(-1)
    return _SumSoftplus.apply(logits)


class VAE(nn.Module):
    """DLGM with a flow posterior ``q_K(z | x)`` (paper Sec. 4 and 6.2). See the module docstring.

    Args:
        encoder: ``x (B, *x_shape) -> h (B, H)``, with attribute ``out_dim = H``.
        decoder: ``z (*, D) -> params (*, *x_shape)`` for the likelihood.
        flow: a flow on R^D whose parameters are computed from ``h`` (``context_dim = H``) or global.
        latent_dim: D.
        x_shape: shape of one data point, e.g. ``(784,)``.
        likelihood: key of :data:`LIKELIHOODS`.
        min_scale: floor on q_0's standard deviations.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        flow: Flow,
        latent_dim: int,
        x_shape: tuple[int, ...],
        likelihood: str = "bernoulli",
        min_scale: float = 1e-4,
    ):
        super().__init__()
        self.encoder, self.decoder, self.flow = encoder, decoder, flow
        self.latent_dim, self.x_shape = latent_dim, tuple(x_shape)
        self.likelihood, self.min_scale = likelihood, min_scale
        self.gaussian_head = nn.Linear(encoder.out_dim, 2 * latent_dim)  # [mu, raw sigma]
        self.register_buffer("_zeros", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("_ones", torch.ones(latent_dim), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._zeros.device

    def autocast_modules(self) -> list[nn.Module]:
        """The networks that ``trainer.precision=bf16`` runs under autocast (:func:`nfvi.precision.set_precision`):
        the encoder, q_0's Gaussian head, the decoder and an amortized flow's parameter head. The flow's layers,
        the log-determinants and every log-density stay float32."""
        head = getattr(self.flow, "head", None)
        return [self.encoder, self.gaussian_head, self.decoder, *([head] if isinstance(head, nn.Module) else [])]

    @property
    def prior(self) -> Distribution:
        """``p(z) = N(0, I)`` over R^D, on the model's device and dtype."""
        return Independent(Normal(self._zeros, self._ones, validate_args=False), 1, validate_args=False)

    def prepare(self, x: Tensor) -> Tensor:
        """``x`` as ``(B, *x_shape)`` on the model's device and dtype (accepts e.g. ``(B, 1, 28, 28)``).

        A uint8 tensor holds 8-bit values ``k`` (0..255) and becomes ``k / 255``.
        """
        if x.dtype == torch.uint8:
            x = x.to(device=self._zeros.device).to(self._zeros.dtype).div_(255.0)
        return x.to(device=self._zeros.device, dtype=self._zeros.dtype).reshape(x.shape[0], *self.x_shape)

    def _q0_params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.encoder(self.prepare(x))
        loc, raw = self.gaussian_head(h).chunk(2, dim=-1)
        return loc, F.softplus(raw) + self.min_scale, h

    def encode(self, x: Tensor) -> tuple[Distribution, Tensor]:
        """``q_0(z | x) = Independent(Normal(mu, sigma), 1)`` (batch ``(B,)``) and the flow's context ``h (B, H)``."""
        loc, scale, h = self._q0_params(x)
        return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False), h

    def sample_posterior(self, x: Tensor, num_samples: int) -> PosteriorSample:
        """Draw ``S = num_samples`` paths ``z_0 ~ q_0(. | x)``, ``z_K = f_K o ... o f_1(z_0)`` per data point.

        The standard-normal noise is drawn in (data point, sample) order, so a data point's draws do
        not depend on how many other points share the call: exactly so on the CPU generator when the
        draws' sizes (S * D per point) are multiples of 16, PyTorch's block for normal sampling (e.g.
        D = 40 and even S); otherwise only in distribution.
        """
        loc, scale, h = self._q0_params(x)
        batch, dim = loc.shape
        eps = torch.randn(batch, num_samples, dim, dtype=loc.dtype, device=loc.device).transpose(0, 1)
        z_0 = (loc + scale * eps).contiguous()
        log_q0 = -0.5 * (eps.square().sum(-1) + dim * LOG_2PI) - scale.log().sum(-1)
        z_k, log_det = self.flow(z_0, h)
        return PosteriorSample(z_0, z_k, log_q0, log_det)

    def posterior(self, x: Tensor, num_samples: int) -> tuple[Tensor, Tensor]:
        """``z_K (S, B, D)`` and ``log q_K(z_K | x) = log q_0(z_0 | x) - sum_k log|det J_k|`` ``(S, B)`` (Eq. 7)."""
        sample = self.sample_posterior(x, num_samples)
        return sample.z_k, sample.log_q0 - sample.log_det

    def decode(self, z: Tensor) -> Distribution:
        """``p(x | z)`` with batch shape ``z.shape[:-1]`` and event shape ``x_shape``."""
        return LIKELIHOODS[self.likelihood](self.decoder(z), len(self.x_shape))

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(x | z)``, shape ``z.shape[:-1]``; ``x (B, *x_shape)`` broadcasts against ``z (*, B, D)``.

        Bernoulli: ``sum_d x_d l_d - softplus(l_d)`` on the logits ``l`` (the same value as
        ``Bernoulli(logits=l).log_prob(x)`` summed, in two passes over the logits instead of about six; with one
        data point, as in importance sampling, ``sum_d x_d l_d`` is a matrix-vector product).
        """
        if self.likelihood != "bernoulli":
            return self.decode(z).log_prob(self.prepare(x))
        logits = self.decoder(z)
        x = self.prepare(x)
        event = logits.shape[logits.dim() - len(self.x_shape) :]
        flat = logits.reshape(*logits.shape[: logits.dim() - len(event)], -1)  # (*, B, E)
        x = x.reshape(x.shape[0], -1)
        if x.shape[0] == 1 and flat.shape[-2] == 1:
            dot = (flat.reshape(-1, flat.shape[-1]) @ x[0]).reshape(flat.shape[:-1])
        else:
            dot = (flat * x).sum(-1)
        return dot - _sum_softplus(flat)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(x | z) + log p(z)``, shape ``z.shape[:-1]``. Pass ``z = z_K``: the prior is taken at z."""
        return self.log_likelihood(x, z) + self.prior.log_prob(z)

    @torch.no_grad()
    def init_output_bias(self, x_mean: Tensor, eps: float = 1e-3) -> None:
        """Set the decoder's per-value output bias from the mean training value ``x_mean`` (in [0, 1]).

        Bernoulli: ``logit(mean)``; discretized logistic: mean = ``x_mean`` and a log-scale of
        ``log 0.05``; logit-normal: the logit of the scaled mean. Needs a decoder with a per-value
        ``output_bias`` (the MLP and conv decoders have one).
        """
        bias = getattr(self.decoder, "output_bias", None)
        if bias is None:
            raise NfviError(f"init_output_bias needs a decoder with a per-value output bias ({type(self.decoder)})")
        mean = x_mean.to(bias).reshape(-1)
        if self.likelihood == "bernoulli":
            mean = mean.clamp(eps, 1 - eps)
        bias.copy_(SPECS[self.likelihood].init_bias(mean).reshape(bias.shape))


def build_model(model_cfg: ModelConfig | DictConfig, flow_cfg: FlowConfig | DictConfig, x_dim: int | tuple) -> VAE:
    """The VAE of ``model_cfg`` with the flow of ``flow_cfg`` (amortized on the encoder's features).

    ``x_dim``: size of one flat data point (784 for MNIST), or a shape tuple for other decoders.
    """
    x_shape = (int(x_dim),) if isinstance(x_dim, int) else tuple(int(n) for n in x_dim)
    encoder, decoder = ARCHITECTURES[model_cfg.name](x_shape, model_cfg)
    flow = flow_from_config(flow_cfg, model_cfg.latent_dim, context_dim=encoder.out_dim)
    return VAE(encoder, decoder, flow, model_cfg.latent_dim, x_shape, model_cfg.likelihood, model_cfg.min_scale)
