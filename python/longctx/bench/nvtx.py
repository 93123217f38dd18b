"""NVTX ranges in the "longctx" domain (the same domain the C++ launchers use), so an Nsight
Systems timeline groups benchmark cases and kernels together. A no-op in CPU-only builds."""
from __future__ import annotations

import contextlib

from .. import _C


@contextlib.contextmanager
def nvtx_range(name: str):
    _C.nvtx_push(name)
    try:
        yield
    finally:
        _C.nvtx_pop()
