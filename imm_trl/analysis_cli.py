"""`imm-trl analyze`: the layer analysis (`imm_trl.analysis.analyze`) from the shell."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from imm_trl.analysis import JSON_NAME, PNG_NAME, _format, analyze
from imm_trl.layer_importance import GRADIENT_ATTRIBUTIONS


def read_rows(path: str | os.PathLike, max_rows: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each with `question` and `answer`; blank lines skipped."""
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                raise ValueError(
                    f"{path}:{number}: each line must be a JSON object with 'question' and 'answer'"
                )
            rows.append(row)
            if max_rows is not None and len(rows) >= max_rows:
                break
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def _analyze_command(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    report = analyze(
        args.base,
        args.tuned,
        tokenizer=tokenizer,
        rows=read_rows(args.data, args.max_rows),
        out_dir=args.out,
        score=args.score,
        attribution=args.attribution,
        importance_of=args.importance_of,
        low=args.low,
        high=args.high,
        default=args.default,
        batch_size=args.batch_size,
    )
    print(
        f"{Path(args.out) / JSON_NAME}: {report['num_layers']} layers, "
        f"Spearman rho {_format(report['spearman_rho'])} (p {_format(report['spearman_p'])})"
    )
    return 0


def add_analyze_parser(commands) -> None:
    """Register `imm-trl analyze` on an argparse subparsers object."""
    analyze_parser = commands.add_parser(
        "analyze",
        help="per decoder layer: update magnitude of TUNED vs BASE, importance for a task, "
        "their rank correlation and a suggested per-layer ratio map (JSON + PNG)",
    )
    analyze_parser.add_argument("base", help="original model directory (theta0, safetensors)")
    analyze_parser.add_argument("tuned", help="tuned model directory (safetensors)")
    analyze_parser.add_argument(
        "--data", required=True, help="JSONL task rows with 'question' and 'answer'"
    )
    analyze_parser.add_argument(
        "--out", required=True, help=f"output directory for {JSON_NAME} and {PNG_NAME}"
    )
    analyze_parser.add_argument(
        "--score",
        choices=["loglik", "gradient"],
        default="loglik",
        help="importance: drop in gold log-likelihood when a layer is skipped (loglik), or "
        "its gradient estimate (gradient: one backward pass per batch instead of L+1 passes)",
    )
    analyze_parser.add_argument(
        "--attribution",
        choices=sorted(GRADIENT_ATTRIBUTIONS),
        default="skip",
        help="with --score gradient: first-order estimate of skipping the layer (skip), or "
        "sum of |theta * dL/dtheta| over its parameters (parameters)",
    )
    analyze_parser.add_argument("--max-rows", type=int, help="use only the first N rows")
    analyze_parser.add_argument(
        "--importance-of",
        choices=["base", "tuned"],
        default="base",
        help="whose layers' importance is measured",
    )
    analyze_parser.add_argument(
        "--low", type=float, default=0.3, help="ratio of the most important layer"
    )
    analyze_parser.add_argument(
        "--high", type=float, default=0.7, help="ratio of the least important layer"
    )
    analyze_parser.add_argument(
        "--default", type=float, default=0.5, help="ratio outside the decoder layers"
    )
    analyze_parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    analyze_parser.set_defaults(func=_analyze_command)
