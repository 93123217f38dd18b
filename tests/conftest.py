"""Shared by every test family (tests/<family>/): the helpers of tests/support are importable
by name (`from attention_reference import attention_ref`), GPU-marked tests skip without a GPU,
and each test gets its own reproducible seed.

Processes spawned by the tests (the ring workers) inherit this sys.path."""
import sys
import zlib
from pathlib import Path

import pytest
import torch

import longctx  # noqa: F401  (registers the ops)

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    # Random inputs that differ per test but are reproducible run to run (Python's hash() of a
    # string changes with each process, which made tolerance checks flaky).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
