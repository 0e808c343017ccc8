"""Local `evaluate` module; see the script of the same name."""
