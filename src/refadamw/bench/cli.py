"""Command line: ``refadamw demo`` (also ``python -m refadamw demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refadamw", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small model with each optimizer and time step()")
    demo.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    demo.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    demo.add_argument("--out", default=None, help="folder for demo.json and demo.md")
    demo.add_argument("--readme", default=None, help="rewrite the results block of this README")
    demo.add_argument("--sweep", action="store_true", help="run the defaults sweep instead (a few minutes)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.sweep:
        from . import sweep

        sweep.run(steps=args.steps)
        return 0
    from . import demo as demo_module

    demo_module.run(steps=args.steps, seeds=tuple(range(args.seeds)), out=args.out, readme=args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
