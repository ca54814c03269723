"""Print the record table of docs/energy.md ("Measured") from a sweep folder of ``nfvi energy`` runs.

python -m benchmarks.energy_record outputs/reproduce/quick/energy
"""

from __future__ import annotations

import sys

from nfvi.reports.energy import FLOW_LABEL, _order, to_markdown
from nfvi.reports.task import collect


def main(root: str) -> None:
    frame = collect([root])
    frame = _order(frame[frame["task"] == "energy"])
    table = frame.assign(
        flow=frame["flow"].map(lambda f: FLOW_LABEL.get(f, f)),
        neg_log_z=-frame["log_z"],
        minutes=frame["wall_time_s"] / 60,
    )[["target", "flow", "flow_length", "seed", "bound", "neg_log_z", "kl", "kl_mc", "mass_outside_box", "minutes"]]
    table.columns = ["target", "flow", "K", "seed", "bound", "-log Z_box", "KL box", "KL box (MC)", "q outside", "min"]
    print(to_markdown(table, ".3f"))


if __name__ == "__main__":
    main(sys.argv[1])
