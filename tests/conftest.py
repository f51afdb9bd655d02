import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed JIT-builds its CPU shared-memory comm op on first use (about a minute on 2 cores) into
# TORCH_EXTENSIONS_DIR; one directory per environment, so that two checkouts' environments on one
# machine do not rebuild it in turn (the default ~/.cache is shared and keyed by source path).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_configure(config):
    """Triton's interpreter (NumPy on CPU) runs the Triton kernels of every test, except in a
    `pytest -m gpu` run on a CUDA machine, which compiles them. Triton reads TRITON_INTERPRET
    when it decorates a kernel, so one process is one or the other; this runs before any test
    module (and so any kernel) is imported."""
    if not (_cuda() and config.getoption("markexpr", "").strip() == "gpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is, with the kernels compiled (`pytest -m gpu`)."""
    if not _cuda():
        why = "needs a CUDA device"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        why = "compiled kernels: run `pytest -m gpu` (this run uses Triton's interpreter)"
    else:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "disabled"))
