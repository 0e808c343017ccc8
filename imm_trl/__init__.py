"""imm-trl: Iterative Model Merging for self-improving reasoners, as a TRL plugin."""

__version__ = "0.1.0"
