"""The bad-input table of tests/test_bad_input.py, run and written as markdown: every case,
where it fails and the message a user actually gets.

    python benchmarks/bad_input_table.py        # -> benchmarks/results/bad_input.md
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_bad_input import CASES, WHERE, Case  # noqa: E402


def message_of(case: Case) -> str:
    """What the user sees: `ErrorType: message`, or the counted line of a row case."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            counted = case.run(Path(tmp))
        except Exception as error:
            return f"{type(error).__name__}: {error}".replace(tmp, "<tmp>")
    return next(line for line in counted if re.search(case.message, line))


def markdown_table(cases: list[Case]) -> str:
    kinds = Counter(WHERE[case.where] for case in cases)
    lines = [
        "# Bad input: where it fails and what it says",
        "",
        f"{len(cases)} cases from `tests/test_bad_input.py` ("
        + ", ".join(f"{kind}: {n}" for kind, n in kinds.items())
        + "), written by `benchmarks/bad_input_table.py`.",
        "",
        "| case | input | where it fails | message |",
        "|---:|---|---|---|",
    ]
    for number, case in enumerate(cases, 1):
        cells = [str(number), f"`{case.input}`", WHERE[case.where], message_of(case)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    out = REPO / "benchmarks/results/bad_input.md"
    out.write_text(markdown_table(CASES))
    print(f"wrote {out}")
