"""The two ceilings every result is read against, measured in the same run as the kernels:
device-to-device copy bandwidth (bytes read + bytes written) and the bf16 matrix-product rate."""
from __future__ import annotations

from .timing import time_cuda


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """GB/s (1e9 bytes) of dst.copy_(src) over nbytes, counting the bytes read and written."""
    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), warmup=5, reps=20)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    """TFLOP/s of a bf16 n x n x n product on random data."""
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = time_cuda(lambda: a @ b, warmup=5, reps=20)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12
