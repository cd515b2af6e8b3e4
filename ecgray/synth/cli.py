"""`ecgray synth`: write the embedded synthetic PTB-XL + ECG-QA world (and optionally plot a record)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ecgray.cli import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", help="output root (default: synth.out_dir); writes OUT/ptbxl and OUT/ecgqa/ptbxl"
    )
    parser.add_argument("--patients", type=int, help="number of synthetic patients (default: synth.patients)")
    parser.add_argument(
        "--seed", type=int, help="seed; the same seed writes identical files (default: synth.seed)"
    )
    parser.add_argument("--plot", type=int, metavar="ECG_ID", help="also render this record as a 12-lead PNG")
    parser.add_argument("--plot-out", help="PNG path for --plot (default: OUT/figures/ECG_ID.png)")
    parser.add_argument(
        "--plot-only", action="store_true", help="render --plot from an existing OUT without regenerating"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ecgray.synth.plot import render_record
    from ecgray.synth.world import generate_world

    cfg = config_from_args(args).synth
    out = Path(args.out or cfg.out_dir)
    patients = cfg.patients if args.patients is None else args.patients
    seed = cfg.seed if args.seed is None else args.seed
    if args.plot_only and args.plot is None:
        print("ecgray synth: --plot-only needs --plot ECG_ID", file=sys.stderr)
        return 2
    try:
        if not args.plot_only:
            summary = generate_world(out, patients, seed, progress=not args.quiet)
            print(json.dumps(summary))
        if args.plot is not None:
            db = out / "ptbxl" / "ptbxl_database.csv"
            if not db.is_file():
                print(
                    f"ecgray synth: {db} not found: generate the world first (drop --plot-only)",
                    file=sys.stderr,
                )
                return 2
            path = render_record(
                out / "ptbxl", args.plot, args.plot_out or out / "figures" / f"{args.plot:05d}.png"
            )
            print(f"wrote {path}")
    except ValueError as err:
        print(f"ecgray synth: {err}", file=sys.stderr)
        return 2
    return 0
