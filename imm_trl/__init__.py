"""imm-trl: Iterative Model Merging for self-improving reasoners, as a TRL plugin."""

__version__ = "0.1.0"

__all__ = ["IMMCallback", "IMMConfig", "run_imm", "share_prompt_prefixes"]


def __getattr__(name):
    # Lazy, so `import imm_trl` (e.g. for the CLI's --help) does not import torch and TRL.
    if name == "IMMConfig":
        from imm_trl.config import IMMConfig

        return IMMConfig
    if name == "IMMCallback":
        from imm_trl.callback import IMMCallback

        return IMMCallback
    if name == "run_imm":
        from imm_trl.loop import run_imm

        return run_imm
    if name == "share_prompt_prefixes":
        from imm_trl.shared_prefix import share_prompt_prefixes

        return share_prompt_prefixes
    raise AttributeError(f"module 'imm_trl' has no attribute {name!r}")
