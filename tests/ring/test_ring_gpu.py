"""Ring attention on 2 GPUs over longctx's NCCL communicator (skipped with fewer GPUs).

Spawns one process per GPU (ring_gpu_worker.py). Output, lse, dq, dk, dv of every rank's
shard against float64 attention over the full sequence with FlashAttention-3's rule, widened to
4x the single-GPU flash kernel's own error (the ring adds bf16-rounded partials: see
ring_gpu_worker.py), bf16, head dim 128, both layouts, causal / full /
causal window / two-sided window, GQA 4/2 and MQA 4/1, shards whose chunks are not tile
multiples. And a rank failing inside the loop: the other raises RingTimeoutError after the
timeout instead of hanging.
"""
import time

import pytest
import torch

from gpu_kernels import compiled_cuda
import ring_gpu_worker
from ring_spawn import assert_case_passed, assert_peer_failure_raised, spawn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs 2 CUDA GPUs"),
]

MASKS = {"causal": (True, (-1, -1)), "full": (False, (-1, -1)),
         "causalwin": (True, (300, 0)), "symwin": (False, (200, 200))}


def _cases():
    cases = []
    for layout in ("zigzag", "contiguous"):
        for mask, (causal, window) in MASKS.items():
            for h, hk in ((4, 2), (4, 1)):
                # 2 ranks x 2 chunks of 333 tokens: chunks are not tile multiples
                cases.append(dict(layout=layout, mask=mask, causal=causal, window=window,
                                  h=h, hk=hk, seqlen=4 * 333))
    return cases


_results = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not all((128, "bf16") in compiled_cuda(f) for f in ("flash_fwd", "flash_bwd")):
        pytest.skip("the hdim 128 bf16 CUDA kernels are not compiled")
    if "r" not in _results:
        _results["r"] = spawn(ring_gpu_worker.run_cases, 2, (_cases(),),
                               tmp_path_factory.mktemp("ringgpu"), "res")
    return _results["r"]


@pytest.mark.parametrize("case", _cases(), ids=ring_gpu_worker.case_id)
def test_ring_gpu_matches_single_device(results, case):
    cid = ring_gpu_worker.case_id(case)
    assert_case_passed(results, cid)


def test_ring_gpu_peer_failure_raises(tmp_path):
    timeout_s = 8
    t0 = time.time()
    res = spawn(ring_gpu_worker.run_peer_failure, 2, (timeout_s,), tmp_path, "fail")
    assert res[0]["first"] is None and res[1]["first"] is None, res
    assert_peer_failure_raised(res, timeout_s + 10)
    assert time.time() - t0 < 120
