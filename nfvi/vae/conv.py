"""``model=conv``: a convolutional encoder and decoder for image-shaped data ``(C, H, W)``.

::

    build_model(ModelConfig(name="conv", activation="relu", likelihood="discretized_logistic"), flow_cfg,
                x_dim=(3, 32, 32))

Layout (``c = model.channels``, ``n`` downsamplings by 2: as many as keep H and W even and above 4,
at most 3; 32x32 -> 4x4 (n = 3), 28x28 -> 7x7 (n = 2), 8x8 -> 4x4 (n = 1))::

    encoder  x (B, C, H, W) -> Conv3x3(C -> c) -> [Conv4x4/2 (c_i -> c_{i+1})] x n -> flatten
             -> Linear(-> model.hidden) -> h (B, hidden)        c_i = c * 2^i
    decoder  z (*, D) -> Linear(D -> c_n * h_n * w_n) -> [ConvTranspose4x4/2 (c_{i+1} -> c_i)] x n
             -> Conv3x3(c -> P*C) + a per-value bias -> params (*, P*C, H, W)

with ``model.activation`` (relu or tanh) after every layer but the last. ``h`` is the flow's context
exactly as in the MLP model (the amortized flow parameters are a linear head on it). ``P`` is the
likelihood's number of parameters per value (Bernoulli 1, discretized logistic 2). The decoder's
last bias is per value (not per channel), so ``VAE.init_output_bias`` can start it at the mean image.
``model.layers`` and ``model.maxout_window`` are not used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nfvi.errors import NfviError
from nfvi.vae.likelihoods import SPECS

__all__ = ["ConvEncoder", "ConvDecoder", "conv_architecture", "downsamplings", "MAX_DOWNSAMPLINGS"]

MAX_DOWNSAMPLINGS = 3


def downsamplings(height: int, width: int) -> int:
    """How many times the encoder halves the image: while both sides are even and above 4, at most 3."""
    n = 0
    while n < MAX_DOWNSAMPLINGS and height % 2 == 0 and width % 2 == 0 and min(height, width) > 4:
        height, width, n = height // 2, width // 2, n + 1
    return n


def _activation(name: str) -> nn.Module:
    return nn.Tanh() if name == "tanh" else nn.ReLU()


class ConvEncoder(nn.Module):
    """``x (B, C, H, W) -> h (B, hidden)``; see the module docstring."""

    def __init__(self, x_shape: tuple[int, int, int], cfg):
        super().__init__()
        c_in, height, width = x_shape
        n, c = downsamplings(height, width), int(cfg.channels)
        layers: list[nn.Module] = [nn.Conv2d(c_in, c, 3, padding=1), _activation(cfg.activation)]
        for i in range(n):
            layers += [nn.Conv2d(c * 2**i, c * 2 ** (i + 1), 4, stride=2, padding=1), _activation(cfg.activation)]
        self.convs = nn.Sequential(*layers)
        flat = c * 2**n * (height >> n) * (width >> n)
        self.fc = nn.Sequential(nn.Linear(flat, cfg.hidden), _activation(cfg.activation))
        self.out_dim = int(cfg.hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.convs(x).flatten(1))


class ConvDecoder(nn.Module):
    """``z (*, D) -> params (*, P*C, H, W)``; see the module docstring."""

    def __init__(self, x_shape: tuple[int, int, int], cfg):
        super().__init__()
        c_out, height, width = x_shape
        n, c = downsamplings(height, width), int(cfg.channels)
        num = SPECS[cfg.likelihood].num_params if cfg.likelihood in SPECS else 1
        self.start = (c * 2**n, height >> n, width >> n)
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim, math.prod(self.start)), _activation(cfg.activation))
        layers: list[nn.Module] = []
        for i in reversed(range(n)):
            layers += [nn.ConvTranspose2d(c * 2 ** (i + 1), c * 2**i, 4, stride=2, padding=1)]
            layers += [_activation(cfg.activation)]
        layers.append(nn.Conv2d(c, num * c_out, 3, padding=1, bias=False))
        self.deconvs = nn.Sequential(*layers)
        self.bias = nn.Parameter(torch.zeros(num * c_out, height, width))

    @property
    def output_bias(self) -> Tensor:
        return self.bias

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).unflatten(-1, self.start)
        out = self.deconvs(h) + self.bias
        return out.reshape(*batch, *out.shape[1:])


def conv_architecture(x_shape, cfg):
    """``model.name=conv``: ``(ConvEncoder, ConvDecoder)`` for image-shaped data ``x_shape = (C, H, W)``."""
    if len(x_shape) != 3:
        raise NfviError(
            f"model=conv needs image-shaped data (C, H, W), got x_dim={x_shape if len(x_shape) > 1 else x_shape[0]}; "
            f"build it with x_dim=data.image_shape (nfvi.vae.model.model_input_shape)"
        )
    return ConvEncoder(x_shape, cfg), ConvDecoder(x_shape, cfg)
