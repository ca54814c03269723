"""Search for a short CPU schedule: fit one (target, flow, K) with the given settings and print the KL on the box.

    python -m benchmarks.energy_schedule target=U1 flow=planar flow.length=32 trainer.steps=4000 optim.lr=1e-2

Uses the same ``fit``/``evaluate`` as ``nfvi energy`` (composed config with overrides), single-threaded.
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir

from nfvi import energies
from nfvi.cli import CONF_DIR
from nfvi.config import hydra_version_base
from nfvi.energy import EnergyModel, evaluate, fit
from nfvi.runs import seed_everything
from nfvi.training import flow_from_config


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("overrides", nargs="*", help="nfvi energy overrides, e.g. target=U1 flow=planar flow.length=32")
    args = p.parse_args()
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(CONF_DIR), **hydra_version_base()):
        cfg = compose(config_name="energy", overrides=args.overrides)
    seed_everything(cfg.seed)
    model = EnergyModel(flow_from_config(cfg.flow, dim=2))
    started = time.time()
    energy = energies.ENERGIES[cfg.target]
    loss = fit(model, energies.confine(energy, cfg.eval.box, cfg.wall), cfg)
    took = time.time() - started
    e = cfg.eval
    r = evaluate(model, energy, e.samples, e.box, e.grid, e.chunk, wall=cfg.wall)
    print(
        f"{' '.join(args.overrides)} | train {took:.0f}s | loss {loss:.4f} | bound {r['bound']:.4f} "
        f"| kl {r['kl']:.4f} | kl_mc {r['kl_mc']:.4f} | out {r['mass_outside_box']:.4f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
