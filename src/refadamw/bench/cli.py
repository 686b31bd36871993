"""Command line: ``refadamw demo`` and ``refadamw bench`` (also ``python -m refadamw ...``)."""

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
    bench = sub.add_parser("bench", help="run a benchmark suite on the embedded workloads")
    bench.add_argument("--suite", choices=["precision", "controller", "ladder"], required=True)
    bench.add_argument("--quick", action="store_true", help="small models and short runs (a few minutes)")
    bench.add_argument("--seeds", type=int, default=2, help="seeds per configuration (default 2)")
    bench.add_argument("--workloads", default="shakespeare,fashion_mnist,friedman",
                       help="comma-separated workloads (default: all three)")
    bench.add_argument("--out", default=None, help="folder for <suite>.json and <suite>.md")
    bench.add_argument("--doc", default=None,
                       help="rewrite the <!-- <suite>:start/end --> block of this Markdown file with the report")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(parser, args)
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


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from . import runner, suites

    workloads = tuple(w for w in args.workloads.split(",") if w)
    unknown = [w for w in workloads if w not in runner.WORKLOADS]
    if unknown or not workloads:
        parser.error(f"--workloads: unknown {unknown}; choose from {', '.join(runner.WORKLOADS)}")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    data, report = suites.run(args.suite, args.quick, tuple(range(args.seeds)), workloads)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.suite}.json").write_text(json.dumps(data, indent=1))
        (out / f"{args.suite}.md").write_text(report + "\n")
    if args.doc:
        from .demo import replace_block

        replace_block(args.doc, args.suite, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
