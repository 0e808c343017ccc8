"""`imm-trl` command line. Each subcommand is a small function over its own arguments."""

from __future__ import annotations

import argparse
import sys


def _prepare_model(args: argparse.Namespace) -> int:
    from imm_trl.models import default_model_dir

    print(default_model_dir())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imm-trl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare-model",
        help="convert the offline default model (SmolLM2-135M-Instruct) to safetensors once "
        "and print its directory",
    )
    prepare.set_defaults(func=_prepare_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
