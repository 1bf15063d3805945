"""``python -m triangle.networks [max_resolution]``: widths and parameter counts per stage."""

from __future__ import annotations

import sys

from . import NetworkConfig, build_network, parameter_count, rebuild_network, stage_sequence


def main(max_resolution: int = 1024) -> None:
    cfg = NetworkConfig()
    print(
        f"{cfg}\n{'stage':>12} {'channels':>8} {'generator':>12} {'energy':>12} {'inference':>12}"
    )
    stages = stage_sequence(max_resolution)
    nets = [build_network(kind, cfg, stages[0]) for kind in ("generator", "energy", "inference")]
    for stage in stages:
        nets = [rebuild_network(net, stage) for net in nets]
        name = f"{stage.resolution}{' fade' if stage.fading else ''}"
        counts = " ".join(f"{parameter_count(net):>12,}" for net in nets)
        print(f"{name:>12} {cfg.channels(stage.resolution):>8} {counts}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
