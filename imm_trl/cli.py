"""`imm-trl` command line. Each subcommand is a small function over its own arguments."""

from __future__ import annotations

import argparse
import importlib
import sys


def _prepare_model(args: argparse.Namespace) -> int:
    from imm_trl.models import default_model_dir

    print(default_model_dir())
    return 0


def _merge(args: argparse.Namespace) -> int:
    import json

    from imm_trl.merging import merge_checkpoints

    try:
        ratio = json.loads(args.ratio) if args.ratio.lstrip().startswith("{") else float(args.ratio)
    except ValueError:
        raise ValueError(
            f"--ratio must be a number or a JSON map (got {args.ratio!r}); e.g. --ratio 0.5 or "
            '--ratio \'{"layers.0-7": 0.3, "default": 0.5}\''
        ) from None
    out = merge_checkpoints(
        args.base,
        args.tuned,
        args.out,
        method=args.method,
        ratio=ratio,
        density=args.density,
        seed=args.seed,
        weights=args.weights,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
    )
    print(out)
    return 0


def _add_merge_parser(commands) -> None:
    merge = commands.add_parser(
        "merge",
        help="merge checkpoints on disk: out = base + ratio * M(tuned - base), one tensor at a time",
    )
    merge.add_argument("base", help="original model directory (safetensors)")
    merge.add_argument("tuned", nargs="+", help="one or more tuned model directories")
    merge.add_argument("--out", required=True, help="output directory (must not exist)")
    merge.add_argument("--method", default="linear", help="linear, dare_linear, ties or dare_ties")
    merge.add_argument(
        "--ratio",
        default="0.5",
        help='merge ratio alpha, or a JSON per-layer map like \'{"layers.0-7": 0.3, "default": 0.5}\'',
    )
    merge.add_argument(
        "--density", type=float, default=1.0, help="kept fraction for DARE/TIES, in (0, 1]"
    )
    merge.add_argument("--seed", type=int, default=0, help="seed of the DARE masks")
    merge.add_argument(
        "--weights", type=float, nargs="+", help="one weight per tuned model (default 1.0)"
    )
    merge.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output shard, GiB")
    merge.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle-only checkpoints, loaded with torch.load(weights_only=True)",
    )
    merge.add_argument(
        "--overwrite", action="store_true", help="replace an existing output directory"
    )
    merge.set_defaults(func=_merge)


# Subcommands defined beside their code: (name, module, function adding the subparser). Only
# the one being run is imported, so `imm-trl merge` does not pay for TRL, vLLM and datasets.
LAZY_COMMANDS = (
    ("demo", "imm_trl.demo", "add_demo_parser"),
    ("run", "imm_trl.loop", "add_run_parser"),
    ("eval", "imm_trl.eval_cli", "add_eval_parser"),
    ("analyze", "imm_trl.analysis_cli", "add_analyze_parser"),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; with `command` given, only that lazily defined subcommand is imported
    (every one is, for --help or an unknown command)."""
    parser = argparse.ArgumentParser(prog="imm-trl", description=__doc__)
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error (anywhere in argv)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare-model",
        help="convert the offline default model (SmolLM2-135M-Instruct) to safetensors once "
        "and print its directory",
    )
    prepare.set_defaults(func=_prepare_model)
    _add_merge_parser(commands)
    if command in commands.choices:  # merge, prepare-model: nothing more to import
        return parser
    wanted = [entry for entry in LAZY_COMMANDS if entry[0] == command] or LAZY_COMMANDS
    for _, module, adder in wanted:
        getattr(importlib.import_module(module), adder)(commands)
    return parser


def _command_name(argv: list[str]) -> str | None:
    """The subcommand named in argv: its first argument that is not an option."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


# What bad input raises (our checks, file lookups): one line, not a traceback.
USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # accepted after the subcommand too, where overrides are parsed
    argv = [arg for arg in argv if arg != "--debug"]
    parser = build_parser(_command_name(argv))
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args.func(args)
    except USER_ERRORS as error:
        if debug:
            raise
        message = " ".join(str(error).split())  # one line, as argparse's own errors
        print(f"{parser.prog}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
