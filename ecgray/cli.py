"""ecgray: few-shot ECG question answering with a meta-learned ECG-language model.

The `ecgray` command. Each subcommand lives in its own module, imported only when it runs, and
exposes `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily so `ecgray --help` is instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("ecgray.synth.cli", "generate the embedded synthetic PTB-XL + ECG-QA world"),
    "prepare": ("ecgray.data.prepare", "read WFDB records + ECG-QA once into Parquet shards (Ray Data)"),
    "features": ("ecgray.features", "frozen-encoder features of every prepared ECG, once (Ray Data)"),
    "episodes": ("ecgray.data.episodes_cli", "print N-way K-shot episodes as JSON lines"),
    "pretrain-encoder": ("ecgray.train.pretrain_encoder", "pretrain the built-in ECG encoder"),
    "convert-encoder": (
        "ecgray.models.convert",
        "convert a fairseq-signals ECG encoder (.pt, e.g. ECG-FM) to safetensors",
    ),
    "align": (
        "ecgray.train.align",
        "align the fusion module on ECG-text pairs before meta-training (Ray Train)",
    ),
    "train": ("ecgray.train.meta_train", "meta-train the fusion module with Ray Train"),
    "tune": ("ecgray.train.tune", "sweep inner-loop hyperparameters with Ray Tune"),
    "eval": ("ecgray.eval.cli", "meta-test on unseen classes against the baselines"),
    "serve": ("serve.app", "run the few-shot QA endpoint (Ray Serve)"),
    "ask": ("serve.client", "ask the endpoint a few-shot question"),
    "demo": ("ecgray.demo", "the main job on the embedded defaults, end to end"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecgray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        # Only the chosen subcommand's module is imported, so build its parser on demand.
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    from ecgray.logs import quiet_frameworks

    quiet_frameworks()  # before Ray is imported: its workers inherit the quiet settings
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"ecgray {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    from ecgray.logs import run_command

    return run_command(module, args, f"ecgray {name}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared `--config FILE` and `--set key=value ...` options."""
    parser.add_argument("--config", help="YAML file overriding the typed defaults (configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. --set meta.inner_lr=0.01 model.llm=tiny-llama",
    )


def config_from_args(args: argparse.Namespace):
    """Load the typed config from `--config` / `--set`, relative locations made absolute here (where the
    command was launched); a ConfigError exits with its message."""
    from ecgray.config import ConfigError, load_config, resolve_locations

    try:
        return resolve_locations(load_config(args.config, args.overrides))
    except ConfigError as err:
        from ecgray.logs import say

        say(f"ecgray: {err}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    raise SystemExit(main())
