"""Which CUDA attention kernels this build holds, for GPU tests to skip what was not compiled
(LONGCTX_HEADDIMS / LONGCTX_DTYPES / LONGCTX_DISABLE_BWD restrict the build)."""
import pytest
import torch

import longctx


def _cuda_kernels(family):
    """The build_info entries of `family`'s CUDA kernels."""
    return [k for k in longctx.build_info()["kernels"]
            if k["family"] == family and k["device"] == "cuda"]


def _skip_unless_hopper():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the kernels need a Hopper GPU (sm_90)")


def compiled_cuda(family):
    """{(head_dim, "bf16"|"fp16")} compiled for CUDA in `family` ("flash_fwd", "flash_bwd")."""
    return {
        (int(f[4:]), dt)
        for k in _cuda_kernels(family)
        for f in k["features"]
        if f.startswith("hdim")
        for dt in k["dtypes"]
    }


def skip_unless_compiled(hdim, dtype, families=("flash_fwd",)):
    """Skip the calling test without a Hopper GPU or without the (hdim, dtype) kernels."""
    _skip_unless_hopper()
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    for fam in families:
        if (hdim, name) not in compiled_cuda(fam):
            pytest.skip(f"{fam} hdim {hdim} {name} not compiled in this build")


def skip_unless_family(family):
    """Skip the calling test without a Hopper GPU or without any CUDA kernel of `family`
    ("kvcache", "rope", ...)."""
    _skip_unless_hopper()
    if not _cuda_kernels(family):
        pytest.skip(f"{family} CUDA kernels not compiled in this build")
