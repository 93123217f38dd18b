"""longctx.build_info(): what the installed binary was built against and what it contains."""
from __future__ import annotations

from typing import Any, Dict

import torch

from . import _C

__all__ = ["build_info"]


def build_info() -> Dict[str, Any]:
    """The torch and CUDA versions the extension was built against, the GPU architectures it
    targets, the build switches in force, and each kernel family compiled in (device, dtypes,
    features), read from the binary itself."""
    cfg = _C.build_config()
    kernels = [
        {
            "family": k["family"],
            "device": k["device"],
            "dtypes": [d for d in k["dtypes"].split(",") if d],
            "features": [f for f in k["features"].split(",") if f],
        }
        for k in cfg["kernels"]
    ]
    kernels.sort(key=lambda k: (k["family"], k["device"]))
    from . import __version__

    return {
        "version": __version__,
        "torch_built": cfg["torch_version"],
        "torch_runtime": torch.__version__,
        "with_cuda": bool(cfg["with_cuda"]),
        "with_nccl": bool(cfg.get("with_nccl", False)),
        "cuda_built": cfg["cuda_version"] or None,
        "cuda_archs": [a for a in cfg["cuda_archs"].split(",") if a],
        "switches": cfg["switches"],
        "kernels": kernels,
    }
