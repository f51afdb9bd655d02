import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed JIT-builds its CPU shared-memory comm op on first use (about a minute on 2 cores) into
# TORCH_EXTENSIONS_DIR; one directory per environment, so that two checkouts' environments on one
# machine do not rebuild it in turn (the default ~/.cache is shared and keyed by source path).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

# Without a GPU the Triton kernels are tested in Triton's interpreter (NumPy on CPU). Triton
# reads this when it decorates a kernel, so it is set before any test imports one.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is; everything else runs everywhere."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "disabled"))
