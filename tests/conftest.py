import os

# Tests never touch the network: the hub is unreachable here and in CI.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_model_dir():
    """Safetensors directory of the real default model (converted once, then cached)."""
    from imm_trl.models import default_model_dir as _dir

    return _dir()


@pytest.fixture(scope="module")
def default_model():
    """(model, tokenizer) of the real default model in fp32, loaded once per test module."""
    import torch

    from imm_trl.models import load_default_model

    return load_default_model(dtype=torch.float32)
