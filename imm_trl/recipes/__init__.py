"""The recipes shipped with the package (package data, so an installed wheel has them too).

    from imm_trl.recipes import read_recipe, recipe_path
    read_recipe("default")            # the raw dict of imm_trl/recipes/default.yaml
    recipe_path("paper")              # its file; a path to any YAML file is returned as is

`imm-trl run --config default` resolves through `recipe_path`. The repository's top-level
`recipes/` is a link to this directory, so `recipes/default.yaml` keeps working in a checkout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).resolve().parent
ACCELERATE_CONFIGS_DIR = RECIPES_DIR / "accelerate_configs"


def recipe_names() -> list[str]:
    """The names of the packaged recipes (`default`, `paper`, ...)."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """The YAML file of a packaged recipe named `name_or_path` (a bare name, no suffix or
    directory), else `name_or_path` itself as a path."""
    text = str(name_or_path)
    is_bare_name = os.sep not in text and "/" not in text and not text.endswith((".yaml", ".yml"))
    if is_bare_name and not Path(text).exists():
        packaged = RECIPES_DIR / f"{text}.yaml"
        if not packaged.is_file():
            raise FileNotFoundError(
                f"no packaged recipe named {text!r}; packaged recipes: {', '.join(recipe_names())} "
                "(or give the path of a recipe YAML file)"
            )
        return packaged
    return Path(name_or_path)


def read_recipe(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The raw (unvalidated) recipe dict of a packaged recipe name or a YAML path; a fresh dict
    on every call, so callers may change it."""
    path = recipe_path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {str(path)!r} does not exist; check the --config path")
    raw = yaml.safe_load(path.read_text())
    return {} if raw is None else raw
