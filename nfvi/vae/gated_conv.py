"""``model=gated_conv``: the gated convolutional encoder and decoder of Sylvester normalizing flows.

van den Berg, Hasenclever, Tomczak & Welling, "Sylvester Normalizing Flows for Variational Inference",
UAI 2018 (arXiv 1803.05649); this mirrors their code (``riannevdberg/sylvester-flows``,
``models/layers.py``: ``GatedConv2d``, ``GatedConvTranspose2d``; ``models/VAE.py``: ``VAE.create_encoder``
and ``VAE.create_decoder`` for ``input_type='binary'`` and ``input_size=[1, 28, 28]``)::

    build_model(ModelConfig(name="gated_conv", activation="relu", latent_dim=64, likelihood="bernoulli"),
                flow_cfg, x_dim=(1, 28, 28))

Every layer is a gated convolution (Dauphin et al. 2017), two convolutions of the same shape::

    GatedConv(x) = A(x) * sigmoid(B(x))          (A, B: Conv2d or ConvTranspose2d; no other nonlinearity)

Layers (``conv k/s/p``: kernel, stride, padding; ``op``: the transposed conv's output padding)::

    encoder  x (B, 1, 28, 28)
             GatedConv2d  1 -> 32    5/1/2   (B, 32, 28, 28)
             GatedConv2d 32 -> 32    5/2/2   (B, 32, 14, 14)
             GatedConv2d 32 -> 64    5/1/2   (B, 64, 14, 14)
             GatedConv2d 64 -> 64    5/2/2   (B, 64, 7, 7)
             GatedConv2d 64 -> 64    5/1/2   (B, 64, 7, 7)
             GatedConv2d 64 -> 256   7/1/0   (B, 256, 1, 1) -> flatten -> h (B, 256)
    decoder  z (*, D) -> (N, D, 1, 1)                               N = prod(*)
             GatedConvTranspose2d  D -> 64  7/1/0       (N, 64, 7, 7)
             GatedConvTranspose2d 64 -> 64  5/1/2       (N, 64, 7, 7)
             GatedConvTranspose2d 64 -> 32  5/2/2 op 1  (N, 32, 14, 14)
             GatedConvTranspose2d 32 -> 32  5/1/2       (N, 32, 14, 14)
             GatedConvTranspose2d 32 -> 32  5/2/2 op 1  (N, 32, 28, 28)
             GatedConvTranspose2d 32 -> 32  5/1/2       (N, 32, 28, 28)
             Conv2d 32 -> 1  1x1 (no bias) + a per-pixel bias (1, 28, 28) -> logits (*, 1, 28, 28)

``h`` (256 features) is both q_0's input (nfvi's :attr:`~nfvi.vae.model.VAE.gaussian_head`, a
``Linear(256, 2D)`` as their ``q_z_mean`` + ``q_z_var``, with ``sigma = softplus + min_scale`` where they
take softplus as the variance) and the flow's context (its amortized parameters are linear in ``h``,
as theirs). The decoder returns Bernoulli **logits** (they apply a sigmoid and a BCE loss: the same
likelihood). Differences in parameters from their encoder + heads + decoder: the 1x1 output conv's
single bias (1) is replaced by a per-pixel bias (784), so that ``VAE.init_output_bias`` can start it
at the mean image: +783 parameters, e.g. 3,067,888 against their 3,067,105 for D = 64.

Initialisation (``model.init``): ``torch`` (default) keeps PyTorch's initialisation, as their code does.
With it the signal vanishes along the gates (each layer scales it by about 0.3): at initialisation the
encoder's features vary across images by ~1e-4 and the decoder's logits across z by ~1e-5, and training
with Adamax 5e-4 sits at the independent-pixel plateau (-ELBO ~206 on static MNIST) for hundreds of
updates even at beta ~ 0. ``unit_variance`` rescales each gate's ``A`` convolution (bias zero) so that
its gated output has unit root-mean-square on a probe batch, layer by layer (LSUV, Mishkin & Matas 2016):
random binary images for the encoder, ``z ~ N(0, I)`` for the decoder. The CPU profile
(``experiment=sylvester_quick``) uses it so that a few hundred updates leave the plateau.

As in their binary model, the gates' first convolution has no activation (``A`` is linear), so
``model.activation`` is not read (``build_model`` still requires relu or tanh for image models),
nor are ``model.hidden``, ``model.channels``, ``model.layers`` and ``model.maxout_window``. Only
binary 1x28x28 images (MNIST, Omniglot) with ``model.likelihood=bernoulli`` are supported.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nfvi.errors import NfviError

__all__ = [
    "FEATURES",
    "GATE_INITS",
    "GatedConv2d",
    "GatedConvTranspose2d",
    "GatedConvDecoder",
    "GatedConvEncoder",
    "IMAGE_SHAPE",
    "gated_conv_architecture",
]

IMAGE_SHAPE = (1, 28, 28)
FEATURES = 256  # h, the encoder's output and the flow's context
GATE_INITS = ("torch", "unit_variance")  # model.init
PROBE_BATCH = 64  # probe inputs for unit_variance


class _Gated(nn.Module):
    """``activation(A(x)) * sigmoid(B(x))`` for two layers ``A`` (:attr:`h`) and ``B`` (:attr:`g`) of one shape."""

    def __init__(self, h: nn.Module, g: nn.Module, activation: nn.Module | None = None):
        super().__init__()
        self.h, self.g = h, g
        self.activation = activation if activation is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.h(x)) * torch.sigmoid(self.g(x))


class GatedConv2d(_Gated):
    """Gated ``Conv2d``: ``(N, c_in, H, W) -> (N, c_out, H', W')``; ``activation`` on ``A`` (None: linear)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, activation=None):
        args = (c_in, c_out, kernel, stride, padding)
        super().__init__(nn.Conv2d(*args), nn.Conv2d(*args), activation)


class GatedConvTranspose2d(_Gated):
    """Gated ``ConvTranspose2d``: ``(N, c_in, H, W) -> (N, c_out, H', W')``; ``activation`` as in GatedConv2d."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, output_padding: int = 0, activation=None
    ):
        args = (c_in, c_out, kernel, stride, padding, output_padding)
        super().__init__(nn.ConvTranspose2d(*args), nn.ConvTranspose2d(*args), activation)


class GatedConvEncoder(nn.Module):
    """``x (B, 1, 28, 28) -> h (B, 256)``; see the module docstring's layer table."""

    def __init__(self, x_shape: tuple[int, int, int] = IMAGE_SHAPE):
        super().__init__()
        c = x_shape[0]
        self.net = nn.Sequential(
            GatedConv2d(c, 32, 5, 1, 2),
            GatedConv2d(32, 32, 5, 2, 2),
            GatedConv2d(32, 64, 5, 1, 2),
            GatedConv2d(64, 64, 5, 2, 2),
            GatedConv2d(64, 64, 5, 1, 2),
            GatedConv2d(64, FEATURES, 7, 1, 0),
        )
        self.out_dim = FEATURES

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1)


class GatedConvDecoder(nn.Module):
    """``z (*, D) -> logits (*, 1, 28, 28)``, any number of leading dims; see the module docstring."""

    def __init__(self, x_shape: tuple[int, int, int], latent_dim: int):
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.net = nn.Sequential(
            GatedConvTranspose2d(self.latent_dim, 64, 7, 1, 0),
            GatedConvTranspose2d(64, 64, 5, 1, 2),
            GatedConvTranspose2d(64, 32, 5, 2, 2, 1),
            GatedConvTranspose2d(32, 32, 5, 1, 2),
            GatedConvTranspose2d(32, 32, 5, 2, 2, 1),
            GatedConvTranspose2d(32, 32, 5, 1, 2),
            nn.Conv2d(32, x_shape[0], 1, bias=False),
        )
        self.bias = nn.Parameter(torch.zeros(x_shape))

    @property
    def output_bias(self) -> Tensor:
        """The per-pixel bias ``(1, 28, 28)`` added to the logits (``VAE.init_output_bias`` sets it)."""
        return self.bias

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[:-1]
        out = self.net(z.reshape(-1, z.shape[-1], 1, 1)) + self.bias
        return out.reshape(*batch, *out.shape[1:])


@torch.no_grad()
def unit_variance_init(net: nn.Sequential, probe: Tensor) -> None:
    """Rescale each gated layer of ``net`` in order so that its output on ``probe`` has unit RMS (LSUV).

    Only the ``A`` convolution of each gate is rescaled (its bias set to zero); the gates ``B`` and any
    other layer keep their initialisation. ``probe``: a batch of inputs of ``net``.
    """
    h = probe
    for layer in net:
        if isinstance(layer, _Gated):
            nn.init.zeros_(layer.h.bias)
            rms = layer(h).square().mean().sqrt()
            layer.h.weight.div_(rms.clamp_min(1e-12))
        h = layer(h)


def gated_conv_architecture(x_shape, cfg):
    """``model.name=gated_conv``: ``(GatedConvEncoder, GatedConvDecoder)`` for binary 1x28x28 images."""
    if tuple(x_shape) != IMAGE_SHAPE:
        got = tuple(x_shape) if len(x_shape) > 1 else x_shape[0]
        raise NfviError(f"model=gated_conv takes binary 1x28x28 images (x_dim=(1, 28, 28)), got x_dim={got}")
    if cfg.likelihood != "bernoulli":
        raise NfviError(
            f"model=gated_conv supports model.likelihood=bernoulli (binary images) only, got {cfg.likelihood!r}"
        )
    encoder, decoder = GatedConvEncoder(IMAGE_SHAPE), GatedConvDecoder(IMAGE_SHAPE, cfg.latent_dim)
    if cfg.init == "unit_variance":
        unit_variance_init(encoder.net, torch.rand(PROBE_BATCH, *IMAGE_SHAPE).round())
        unit_variance_init(decoder.net, torch.randn(PROBE_BATCH, cfg.latent_dim, 1, 1))
    return encoder, decoder
