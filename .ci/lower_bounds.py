"""Print pip constraints that pin each dependency of pyproject.toml to its lower bound.

Usage: python .ci/lower_bounds.py EXTRA [EXTRA ...] > constraints.txt
       python .ci/lower_bounds.py --check constraints.txt   (in the installed venv: were the
       pins what got installed? needs `packaging`, which transformers installs)

Covers `[project].dependencies` and the named optional-dependency groups. Every requirement
must carry a `>=` lower bound: a dependency without one is an error here, since the
min-versions job could not say which oldest version it stands for. `torch` is pinned to the
lower bound's CPU build (`+cpu`), as requirements/lock-cpu.txt installs it: the default
build of torch on Linux pulls gigabytes of CUDA libraries that a CPU test tier never loads.
Standard library only (tomllib: Python 3.11+), so it runs before any install.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)")
CPU_BUILDS = {"torch"}


def lower_bound(requirement: str) -> tuple[str, str]:
    """`"torch>=2.13,<3"` -> `("torch", "2.13")`; a requirement without `>=` is an error."""
    match = REQUIREMENT.match(requirement)
    name, specifiers = match.group(1), match.group(3)
    bounds = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(">=")]
    if len(bounds) != 1:
        raise SystemExit(
            f"pyproject.toml: {requirement!r} needs exactly one `>=` lower bound for the "
            "min-versions job; add one (the oldest version the fast test tier passes with)"
        )
    return name.lower(), bounds[0]


def constraints(pyproject: dict, extras: list[str]) -> list[str]:
    """One `name==lower` line per requirement of the core dependencies and `extras`."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise SystemExit(f"no optional-dependency group {unknown}; groups: {sorted(optional)}")
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += optional[extra]
    lines = []
    for name, version in sorted(dict(lower_bound(r) for r in requirements).items()):
        lines.append(f"{name}=={version}+cpu" if name in CPU_BUILDS else f"{name}=={version}")
    return lines


def check_installed(constraints_file: str) -> list[str]:
    """The pins of `constraints_file` that the running environment does not have installed."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    missing = []
    for line in Path(constraints_file).read_text().split():
        name, pinned = line.split("==")
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "nothing"
        if installed == "nothing" or Version(installed) != Version(pinned):
            missing.append(f"{line} (installed: {installed})")
    return missing


if __name__ == "__main__":
    if sys.argv[1:2] == ["--check"]:
        off = check_installed(sys.argv[2])
        sys.exit(f"min-versions: pins not installed: {off}" if off else 0)
    root = Path(__file__).resolve().parent.parent
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    print("\n".join(constraints(pyproject, sys.argv[1:])))
