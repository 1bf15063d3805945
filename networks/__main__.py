"""``python -m triangle.networks [max_resolution]``: widths and parameter counts per stage.

Plain ``argparse``: the library imports no click (docs/design.md, "Where things are")."""

from __future__ import annotations

import argparse

from ..resolutions import is_resolution
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


def _resolution(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not is_resolution(value):
        raise argparse.ArgumentTypeError(f"{text} is not a power of two >= 4 (4, 8, ..., 1024)")
    return value


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m triangle.networks",
        description="Widths and parameter counts of the generator, energy and inference models at "
                    "every stage up to MAX_RESOLUTION, with the default network configuration.")
    parser.add_argument("max_resolution", nargs="?", type=_resolution, default=1024,
                        metavar="MAX_RESOLUTION", help="the last stage's resolution (default 1024)")
    main(parser.parse_args().max_resolution)
