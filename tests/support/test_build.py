"""The installed binary: build_info reports what it contains, and it links the C++ runtime the
way torch does (a private static libstdc++ inside the extension crashes at its first iostream use
against torch's shared one: seen with a toolchain that links libstdc++ statically)."""
import shutil
import subprocess
import sys

import pytest
import torch

import longctx
from longctx import _C


def test_build_info_reports_compiled_kernels():
    info = longctx.build_info()
    assert info["torch_runtime"] == torch.__version__
    assert info["torch_built"].split("+")[0] == torch.__version__.split("+")[0], \
        "extension built against another torch than the one running it"
    fams = {(k["family"], k["device"]) for k in info["kernels"]}
    assert ("rope", "cpu") in fams
    if info["with_cuda"]:
        assert ("rope", "cuda") in fams
        assert info["cuda_archs"] and info["cuda_built"]
    for k in info["kernels"]:
        assert k["dtypes"], k


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="needs readelf on Linux")
def test_extension_links_libstdcxx_dynamically():
    dyn = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True).stdout
    assert "libstdc++.so" in dyn, (
        f"{_C.__file__} does not link libstdc++ dynamically; its compiler linked a private static "
        "copy, which crashes against torch's. Rebuild with the system g++ (CXX=/usr/bin/g++).")
