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
    bench = sub.add_parser("bench", help="compare the optimizers on the embedded workloads (the main job)")
    bench.add_argument("--suite", choices=["main", "precision", "controller", "ladder", "seed", "lora", "backward",
                                                  "step", "robustness", "defaults"],
                       default="main", help="main (default): every optimizer, tuned; the others study one feature")
    bench.add_argument("--quick", action="store_true", help="small models and short runs (about 2 minutes)")
    bench.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default: 1 quick, 2 full)")
    bench.add_argument("--workloads", default=None,
                       help="comma-separated workloads (default: main suite: lora_finetune with --quick, all but "
                            "fashion_mnist without; robustness: friedman,digits_resnet; defaults: the five of the main "
                            "suite's table; other suites: "
                            "shakespeare,digits_resnet,friedman)")
    bench.add_argument("--optimizers", default=None,
                       help="main suite: comma-separated optimizers (default: all of them)")
    bench.add_argument("--out", default=None,
                       help="folder for the results (main suite: results.json, results.md and PNG curves; "
                            "default bench-results); other suites: <suite>.json, <suite>.md (step: and step.png)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="step suite: build the models and gradients on this device (default cpu)")
    bench.add_argument("--doc", default=None,
                       help="rewrite the <!-- <suite>:start/end --> block of this Markdown file with the report")
    bench.add_argument("--readme", default=None, help="main suite: rewrite the <!-- bench:start/end --> block")
    bench.add_argument("--benchmarks", default=None, help="main suite: write this file (BENCHMARKS.md) whole")
    bench.add_argument("--render", default=None, metavar="RESULTS_JSON",
                       help="main suite: run nothing; rebuild the report, curves, --readme and --benchmarks "
                            "from an earlier run's results.json; several, comma-separated (base first): each "
                            "later file's optimizers replace the earlier rows on its workloads, and the merged "
                            "results.json is written to --out")
    bench.add_argument("--retime", action="store_true",
                       help="with --render: time step() again now and rewrite results.json's step() row (for a "
                            "run whose timing shared the CPU with other work); the losses are kept")
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
    from .optimizers import NAMES

    if args.workloads is None:
        workloads = (suites.DEFAULT_WORKLOADS.get(args.suite, runner.SUITE_WORKLOADS) if args.suite != "main" else
                     runner.QUICK_WORKLOADS if args.quick else runner.MAIN_WORKLOADS)
    else:
        workloads = tuple(w for w in args.workloads.split(",") if w)
    unknown = [w for w in workloads if w not in runner.WORKLOADS]
    if unknown or not workloads:
        parser.error(f"--workloads: unknown {unknown}; choose from {', '.join(runner.WORKLOADS)}")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    if seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.suite != "main" and (args.optimizers or args.readme or args.benchmarks or args.render):
        parser.error("--optimizers, --readme, --benchmarks and --render belong to the main suite")
    if args.retime and not args.render:
        parser.error("--retime re-times an earlier run: give its results.json with --render")
    if args.device != "cpu":
        if args.suite != "step":
            parser.error("--device belongs to the step suite")
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device cuda: no CUDA device is available to this torch ({torch.__version__})")
    if args.suite == "main":
        optimizers = tuple(o for o in (args.optimizers or ",".join(NAMES)).split(",") if o)
        bad = [o for o in optimizers if o not in NAMES]
        if bad or not optimizers:
            parser.error(f"--optimizers: unknown {bad}; choose from {', '.join(NAMES)}")
        if "adamw_cosine" not in optimizers:
            parser.error("--optimizers must include adamw_cosine, the baseline every ratio is taken against")
        return _main_job(args, tuple(range(seeds)), workloads, optimizers)
    data, report = suites.run(args.suite, args.quick, tuple(range(seeds)), workloads, device=args.device)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.suite}.json").write_text(json.dumps(data, indent=1))
        (out / f"{args.suite}.md").write_text(report + "\n")
        if args.suite in suites.FIGURES:
            try:
                print(f"wrote {suites.FIGURES[args.suite](data, out)}")
            except ImportError:
                print("no PNG figure: matplotlib is missing (pip install 'refadamw[bench]')")
    if args.doc:
        from .demo import replace_block

        replace_block(args.doc, args.suite, report)
    return 0


BENCHMARKS_HEADER = """# Benchmarks

Generated by `refadamw bench{flags} --benchmarks BENCHMARKS.md`; do not edit by hand.
The workloads, peers and measurement rules are described in docs/benchmarks.md.

"""


def _main_job(args, seeds, workloads, optimizers) -> int:
    import json
    from pathlib import Path

    from . import main as main_job
    from . import report

    from .workloads.base import MissingData

    if args.render:
        paths = args.render.split(",")
        files = []
        for path in paths:
            try:
                files.append((path, json.loads(Path(path).read_text())))
            except (OSError, ValueError) as err:
                print(f"refadamw bench: cannot read --render {path}: {err}", file=sys.stderr)
                return 1
            if files[-1][1].get("suite") != "main":
                print(f"refadamw bench: {path} is not a main-suite results.json", file=sys.stderr)
                return 1
        merging = len(files) > 1
        if merging:
            from .merge import merge_results

            try:
                data = merge_results(files)
            except ValueError as err:
                print(f"refadamw bench: {err}", file=sys.stderr)
                return 1
        else:
            data = files[0][1]
        out = Path(args.out) if args.out else Path(paths[0]).parent
        seeds = tuple(data["seeds"])
        if args.retime:
            main_job.retime(data)
    else:
        try:
            data = main_job.run(args.quick, seeds, workloads, optimizers)
        except MissingData as err:
            print(f"refadamw bench: {err}", file=sys.stderr)
            return 1
        out = Path(args.out or "bench-results")
    text = report.markdown(data)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    if not args.render or args.retime or merging:
        (out / "results.json").write_text(json.dumps(data, indent=1))
    (out / "results.md").write_text(text + "\n")
    try:
        from .plots import loss_curves

        written = loss_curves(data["curves"], out)
        print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(written)} PNG loss curves")
    except ImportError:
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}; "
              "no PNG curves: matplotlib is missing (pip install 'refadamw[bench]')")
    if args.readme:
        from .demo import replace_block

        replace_block(args.readme, "bench", report.readme_table(data))
    if args.benchmarks:
        quick = data["quick"]
        from .runner import MAIN_WORKLOADS, QUICK_WORKLOADS

        default_workloads = QUICK_WORKLOADS if quick else MAIN_WORKLOADS
        flags = ((" --quick" if quick else "") + (f" --seeds {len(seeds)}" if len(seeds) != (1 if quick else 2) else "")
                 + (f" --workloads {','.join(data['workloads'])}"
                    if tuple(data["workloads"]) != default_workloads else "") + f" --out {out}")
        from .demo import blocks

        path = Path(args.benchmarks)
        kept = blocks(path.read_text()) if path.exists() else []  # other suites' tables (--suite step --doc)
        path.write_text(BENCHMARKS_HEADER.format(flags=flags) + text + "\n" + "".join(f"\n{b}\n" for b in kept))
    return 0


if __name__ == "__main__":
    sys.exit(main())
