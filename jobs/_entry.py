"""The shared shape of every job: the `ecgray <command>` module's arguments and `run`, under `python -m jobs.<name>`
(so `ray job submit --working-dir . -- python -m jobs.<name> --config ...` runs the same code as the CLI)."""

from __future__ import annotations

import argparse
import importlib
import sys


def main(module_name: str, prog: str, description: str, argv: list[str] | None = None) -> int:
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    module.add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from ecgray.logs import run_command

    return run_command(module, args, prog)
