"""`python -m data_plane [--config FILE]`: run the gateway (settings from PROCTOR_* variables)."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_plane.app import run
from data_plane.config import GatewayConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_plane", description="Proctor gateway")
    parser.add_argument("--config", type=Path, help="JSON file of gateway settings (else PROCTOR_* variables)")
    args = parser.parse_args(argv)
    run(GatewayConfig.from_file(args.config) if args.config else GatewayConfig.from_env())


if __name__ == "__main__":
    main()
