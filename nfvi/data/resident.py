"""The training set resident on the device, its minibatches drawn there (``nfvi train`` on CUDA).

::

    batches = ResidentBatches(data.train, batch_size=100, dynamic=True, device="cuda", seed=0)
    x = batches.next()                  # (100, 784) float32 0/1 on the device; no host work, no synchronisation

On CUDA, gathering a batch on the host and copying it over costs more than a small model's update, and every
host-to-device copy from pageable memory waits for the device. Here the whole training split is copied once:
binarized MNIST as uint8 (50,000 x 784 bytes, about 39 MB; the grey levels ``k`` of dynamically binarized data, or
the fixed 0/1 values), and each epoch's permutation, the batch gather and the dynamic binarization
(``bernoulli(k / 255)``) run on the device with a generator of that device. Data that are not k/255 grey levels
(``dataset=fake``'s Bernoulli means) are kept as float32. 8-bit data (CIFAR) stay uint8 and are passed on as
such (the model reads ``k / 255``).

Same protocol as the host path of :class:`nfvi.vae.task.Trainer` (a fresh permutation per epoch, the last
incomplete batch dropped, a fresh Bernoulli draw of each image each time it is drawn), but another random
stream: the batches differ from the host path's. ``state()`` / ``load_state()`` save and restore the position,
the permutation and the generator, so a run resumed on the same device continues the same batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ResidentBatches"]


def _as_grey_levels(train: Tensor) -> Tensor | None:
    """``train`` (floats in [0, 1]) as uint8 ``k`` if every value is exactly ``k / 255`` (as float32); else None."""
    k = torch.round(train.float() * 255.0).clamp_(0, 255)
    return k.to(torch.uint8) if torch.equal(k.div(255.0), train.float()) else None


class ResidentBatches:
    """Minibatches of ``train`` ``(N, D)`` drawn on ``device`` (module docstring).

    Args:
        train: the training split as :func:`nfvi.data.load_dataset` gives it (float32 in [0, 1], or uint8 8-bit).
        batch_size: images per batch.
        dynamic: draw a fresh binarization of each batch (``train`` holds Bernoulli means).
        device: where the data and the generator live.
        seed: the generator's seed.
        eight_bit: ``train`` holds 8-bit values (uint8) that the model reads as ``k / 255``.
    """

    def __init__(self, train: Tensor, batch_size: int, dynamic: bool, device, seed: int, eight_bit: bool = False):
        self.device = torch.device(device)
        self.batch_size, self.dynamic, self.eight_bit = int(batch_size), bool(dynamic), bool(eight_bit)
        if eight_bit:
            stored, self.scale = train.to(torch.uint8), None
        else:
            levels = _as_grey_levels(train) if dynamic else train.to(torch.uint8)  # static: exactly 0/1
            stored, self.scale = (levels, 255.0 if dynamic else 1.0) if levels is not None else (train.float(), 1.0)
        self.train = stored.to(self.device)
        self.n = len(train)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.perm: Tensor | None = None
        self.pos = 0
        self.epoch = 0

    @property
    def nbytes(self) -> int:
        return self.train.numel() * self.train.element_size()

    def next(self) -> Tensor:
        """The next batch ``(batch_size, D)`` on the device: float32 0/1 (binary data) or uint8 (8-bit data)."""
        bs = self.batch_size
        if self.perm is None or self.pos + bs > self.n:  # a new epoch; the last incomplete batch is dropped
            if self.perm is not None:
                self.epoch += 1
            self.perm = torch.randperm(self.n, generator=self.generator, device=self.device)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + bs]
        self.pos += bs
        x = self.train.index_select(0, idx)
        if self.eight_bit:
            return x
        x = x.float()
        if self.scale != 1.0:
            x = x.div_(self.scale)
        return torch.bernoulli(x, generator=self.generator) if self.dynamic else x

    def state(self) -> dict:
        """What a checkpoint keeps: the position, the epoch's permutation (on the CPU) and the generator."""
        perm = None if self.perm is None else self.perm.cpu()
        return {"pos": self.pos, "epoch": self.epoch, "perm": perm, "generator": self.generator.get_state()}

    def load_state(self, state: dict) -> None:
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])
        self.perm = None if state["perm"] is None else state["perm"].to(self.device)
        self.generator.set_state(state["generator"])
