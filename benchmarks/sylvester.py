"""``python -m benchmarks.run --only sylvester``: the gated-conv VAE with an amortized O-SNF (van den Berg et al. 2018).

Updates per second of ``nfvi train``'s update (model=gated_conv, flow=sylvester variant=orthogonal, KL warm-up,
Adamax) beside :class:`RefOrthogonalSylvesterVAE`, written the way riannevdberg/sylvester-flows writes it
(models/VAE.py ``OrthogonalSylvesterVAE``: per-layer amortized heads cut out of one Linear, ``resize``-style reshapes,
the batch-orthogonalisation loop run until ``||Q^T Q - I|| <= 1e-6`` (at most 100 steps) with a host sync per step;
models/flows.py ``Sylvester``: one module per layer, a Python loop over the flows; loss as their
``binary_loss_function``: BCE on sigmoid means + beta (log q_0 - log p(z_K) - sum log-det)). Both use the same gated
convolutions (nfvi.vae.gated_conv) so that the figure compares the flow and loss code around them.
Also: importance-sampling seconds per image at S=5000 (``nfvi evaluate``'s chunked estimator) with its peak RSS.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nfvi.config import FlowConfig, OptimConfig
from nfvi.estimators import default_batch_size, log_marginal_likelihood
from nfvi.training import optimizer_from_config
from nfvi.vae.gated_conv import GatedConvDecoder, GatedConvEncoder
from nfvi.vae.model import ModelConfig, build_model
from nfvi.vae.objectives import annealed_loss, beta_schedule, free_energy_terms

SHAPE, Z, K, M, H = (1, 28, 28), 64, 4, 8, 256


def _x(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 784, generator=g) < 0.3).float()


def nfvi_model(seed: int = 0):
    torch.manual_seed(seed)
    mcfg = ModelConfig(name="gated_conv", latent_dim=Z, activation="relu", likelihood="bernoulli")
    return build_model(mcfg, FlowConfig(kind="sylvester", length=K, variant="orthogonal", num_vectors=M), SHAPE)


def make_nfvi_step(batch: int, seed: int = 0):
    """One update as ``nfvi train`` does it: kl_warmup loss, backward, Adamax (lr 5e-4, eps 1e-7) step."""
    model = nfvi_model(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer_from_config(OptimConfig(name="adamax", lr=5e-4, eps=1e-7), params)
    x, state = _x(batch), {"step": 0}
    model.train()

    def step():
        beta = beta_schedule(state["step"], "kl_warmup", start=0.0, steps=50_000)
        loss = annealed_loss(free_energy_terms(model, x, num_samples=1), beta, "kl_warmup").mean()
        float(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] += 1

    return step


class RefSylvester(nn.Module):
    """models/flows.py ``Sylvester``: z' = z + Q R1 h(R2 Q^T z + b); log|det| = sum log|1 + h'(.) diag(R1) diag(R2)|."""

    def __init__(self, num_ortho_vecs: int):
        super().__init__()
        self.h = nn.Tanh()
        self.register_buffer("diag_idx", torch.arange(0, num_ortho_vecs).long())

    def der_h(self, x):
        return 1 - self.h(x) ** 2

    def forward(self, zk, r1, r2, q_ortho, b):
        zk = zk.unsqueeze(1)
        diag_r1 = r1[:, self.diag_idx, self.diag_idx]
        diag_r2 = r2[:, self.diag_idx, self.diag_idx]
        qr2 = torch.bmm(q_ortho, r2.transpose(2, 1))
        qr1 = torch.bmm(q_ortho, r1)
        r2qzb = torch.bmm(zk, qr2) + b
        z = torch.bmm(self.h(r2qzb), qr1.transpose(2, 1)) + zk
        z = z.squeeze(1)
        diag_j = diag_r1 * diag_r2
        diag_j = self.der_h(r2qzb).squeeze(1) * diag_j
        diag_j += 1.0
        log_det_j = diag_j.abs().log().sum(-1)
        return z, log_det_j


class RefOrthogonalSylvesterVAE(nn.Module):
    """models/VAE.py ``OrthogonalSylvesterVAE`` with the gated-conv encoder/decoder (q_z_nn, p_x_nn)."""

    def __init__(self, z_size: int = Z, num_flows: int = K, num_ortho_vecs: int = M):
        super().__init__()
        self.z_size, self.num_flows, self.num_ortho_vecs = z_size, num_flows, num_ortho_vecs
        self.q_z_nn = GatedConvEncoder(SHAPE)
        self.q_z_mean = nn.Linear(H, z_size)
        self.q_z_var = nn.Sequential(nn.Linear(H, z_size), nn.Softplus())  # their binary-input head
        self.p_x_nn = GatedConvDecoder(SHAPE, z_size)  # logits; their p_x_mean ends in a Sigmoid
        self.steps, self.cond = 100, 1.0e-6
        self.diag_activation = nn.Tanh()
        self.register_buffer("_eye", torch.eye(num_ortho_vecs, num_ortho_vecs).unsqueeze(0))
        self.register_buffer(
            "triu_mask", torch.triu(torch.ones(num_ortho_vecs, num_ortho_vecs), diagonal=1).unsqueeze(0).unsqueeze(3)
        )
        self.register_buffer("diag_idx", torch.arange(0, num_ortho_vecs).long())
        self.amor_d = nn.Linear(H, num_flows * num_ortho_vecs * num_ortho_vecs)
        self.amor_diag1 = nn.Sequential(nn.Linear(H, num_ortho_vecs * num_flows), self.diag_activation)
        self.amor_diag2 = nn.Sequential(nn.Linear(H, num_ortho_vecs * num_flows), self.diag_activation)
        self.amor_q = nn.Linear(H, num_flows * z_size * num_ortho_vecs)
        self.amor_b = nn.Linear(H, num_ortho_vecs * num_flows)
        for k in range(num_flows):
            self.add_module("flow_" + str(k), RefSylvester(num_ortho_vecs))

    def batch_construct_orthogonal(self, q):
        """Iterative orthogonalisation (Kovarik / Bjorck) of every (z_size, M) block, to ||Q^T Q - I|| <= cond."""
        q = q.view(-1, self.z_size * self.num_ortho_vecs)
        norm = torch.norm(q, p=2, dim=1, keepdim=True)
        amat = torch.div(q, norm)
        dim0 = amat.size(0)
        amat = amat.reshape(dim0, self.z_size, self.num_ortho_vecs)
        max_norm = 0.0
        for _ in range(self.steps):
            tmp = torch.bmm(amat.transpose(2, 1), amat)
            tmp = self._eye - tmp
            tmp = self._eye + 0.5 * tmp
            amat = torch.bmm(amat, tmp)
            test = torch.bmm(amat.transpose(2, 1), amat) - self._eye
            norms2 = torch.sum(torch.norm(test, p=2, dim=2) ** 2, dim=1)
            norms = torch.sqrt(norms2)
            max_norm = torch.max(norms).item()
            if max_norm <= self.cond:
                break
        amat = amat.view(-1, self.num_flows, self.z_size, self.num_ortho_vecs)
        return amat.transpose(0, 1)

    def encode(self, x):
        batch_size = x.size(0)
        h = self.q_z_nn(x).view(-1, H)
        mean_z, var_z = self.q_z_mean(h), self.q_z_var(h)
        m, k = self.num_ortho_vecs, self.num_flows
        full_d = self.amor_d(h).reshape(batch_size, m, m, k)
        diag1 = self.amor_diag1(h).reshape(batch_size, m, k)
        diag2 = self.amor_diag2(h).reshape(batch_size, m, k)
        r1 = full_d * self.triu_mask
        r2 = full_d.transpose(2, 1) * self.triu_mask
        r1[:, self.diag_idx, self.diag_idx, :] = diag1
        r2[:, self.diag_idx, self.diag_idx, :] = diag2
        q = self.amor_q(h)
        b = self.amor_b(h).reshape(batch_size, 1, m, k)
        return mean_z, var_z, r1, r2, q, b

    def forward(self, x):
        log_det_j = 0.0
        z_mu, z_var, r1, r2, q, b = self.encode(x)
        q_ortho = self.batch_construct_orthogonal(q)
        z = [z_mu + torch.randn_like(z_mu) * z_var.sqrt()]
        for k in range(self.num_flows):
            flow_k = getattr(self, "flow_" + str(k))
            z_k, ldj = flow_k(z[k], r1[:, :, :, k], r2[:, :, :, k], q_ortho[k, :, :, :], b[:, :, :, k])
            z.append(z_k)
            log_det_j = log_det_j + ldj
        x_mean = torch.sigmoid(self.p_x_nn(z[-1]))
        return x_mean, z_mu, z_var, log_det_j, z[0], z[-1]


def ref_loss(x_mean, x, z_mu, z_var, z_0, z_k, ldj, beta):
    """optimization/loss.py ``binary_loss_function``: (BCE + beta * (log q_0(z_0) - log p(z_K) - sum ldj)) / batch."""
    batch_size = x.size(0)
    bce = F.binary_cross_entropy(x_mean.view(batch_size, -1), x.view(batch_size, -1), reduction="sum")
    log_p_zk = torch.sum(-0.5 * z_k * z_k - 0.5 * math.log(2 * math.pi), dim=1)
    log_q_z0 = torch.sum(-0.5 * (torch.log(z_var) + (z_0 - z_mu) ** 2 / z_var) - 0.5 * math.log(2 * math.pi), dim=1)
    kl = torch.sum(log_q_z0 - log_p_zk) - torch.sum(ldj)
    return (bce + beta * kl) / batch_size


def make_ref_step(batch: int, seed: int = 0):
    """One update of the reference: forward, binary_loss_function, backward, Adamax (lr 5e-4, eps 1e-7)."""
    torch.manual_seed(seed)
    model = RefOrthogonalSylvesterVAE()
    opt = torch.optim.Adamax(model.parameters(), lr=5e-4, eps=1e-7)
    x, state = _x(batch).view(-1, *SHAPE), {"step": 0}
    model.train()

    def step():
        beta = min(1.0, state["step"] / 50_000)
        x_mean, z_mu, z_var, ldj, z0, zk = model(x)
        loss = ref_loss(x_mean, x, z_mu, z_var, z0, zk, ldj, beta)
        float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        state["step"] += 1

    return step


def is_child(num_images: int, num_samples: int, chunk: int | None) -> tuple[float, float]:
    """In a fresh process: seconds per image and peak RSS growth (MB) of ``log_marginal_likelihood`` at S samples."""
    import time

    from benchmarks.run import _status_mb

    model = nfvi_model().eval()
    x = _x(num_images)
    log_marginal_likelihood(model, x[:1], 2, batch_size=2)  # loads kernels with tiny tensors
    base = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    t = time.perf_counter()
    log_marginal_likelihood(model, x, num_samples, batch_size=chunk)
    return (time.perf_counter() - t) / num_images, _status_mb("VmHWM") - base


def bench_sylvester(batch: int, repeats: int, number: int, is_images: int = 1, num_samples: int = 5000) -> list[dict]:
    from benchmarks.run import interleaved

    sec = interleaved({"nfvi": make_nfvi_step(batch), "ref": make_ref_step(batch)}, repeats, number, warmup=1)
    rows = [
        {
            "bench": f"gated-conv O-SNF train K={K} M={M} z={Z} batch={batch}",
            "nfvi_per_s": 1 / sec["nfvi"],
            "ref_per_s": 1 / sec["ref"],
            "speedup_vs_ref": sec["ref"] / sec["nfvi"],
        }
    ]
    if is_images:
        code = (
            f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"from benchmarks.sylvester import is_child; print(*is_child({is_images}, {num_samples}, None))"
        )
        root = Path(__file__).resolve().parent.parent
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
        s_per_image, peak = (float(v) for v in res.stdout.split()[-2:])
        rows.append(
            {
                "bench": f"O-SNF IS S={num_samples} on {is_images} image(s), chunk {default_batch_size(None)}",
                "nfvi_s_per_image": s_per_image,
                "peak_mb": peak,
            }
        )
    return rows
