"""Shared by the ring tests (CPU and GPU): spawn one process per rank, run a list of cases in
each, collect the reports.

In the test process:
- spawn(fn, world, args, tmp_path, name) runs fn(rank, world, port, *args, out) in `world`
  spawned processes and returns each rank's JSON report (written to <out>.<rank>.json);
- assert_case_passed(per_rank, cid) and assert_peer_failure_raised(res, max_s) read them.
In a worker:
- run_cases(rank, cases, check, case_id, out): check(case) -> (error or None, detail) for each
  case, exceptions reported as tracebacks, then the report is written and the group torn down;
- peer_failure(rank, call, res, out, linger_s): rank 1 fails inside the ring loop, rank 0 must
  raise instead of hanging.
"""
import json
import os
import socket
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world, args, tmp_path, name):
    out = str(tmp_path / name)
    mp.spawn(fn, args=(world, free_port(), *args, out), nprocs=world, join=True)
    return [json.loads(open(f"{out}.{r}.json").read()) for r in range(world)]


def run_cases(rank, cases, check, case_id, out):
    results = {}
    for c in cases:
        try:
            err, detail = check(c)
            results[case_id(c)] = {"error": err, "detail": detail}
        except Exception:
            results[case_id(c)] = {"error": traceback.format_exc(), "detail": None}
    _write(out, rank, results)
    dist.barrier()
    dist.destroy_process_group()


def _write(out, rank, report):
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(report, f)


def raised(fn):
    """"Type: message" of what fn() raised, or None."""
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def expect_raise(fn) -> str:
    """"Type: message" of what fn() raised, or "no exception"."""
    return raised(fn) or "no exception"


def peer_failure(rank, call, res, out, linger_s):
    """Makes rank 1 fail inside the ring loop (after the argument check) and runs call() on
    every rank: res gets what it raised ("peer_fails") and how long that took, the report is
    written, rank 1 stays alive linger_s seconds (so that rank 0 sees its own timeout, not a
    closed connection), and the process exits without tearing the group down (an exchange is
    still pending)."""
    import longctx.ring.api as api

    def dies(*args, **kwargs):
        raise RuntimeError("injected failure on rank 1")
    if rank == 1:
        api.ring_forward = dies
    t0 = time.time()
    res["peer_fails"] = expect_raise(call)
    res["peer_fails_s"] = time.time() - t0
    _write(out, rank, res)
    if rank == 1:
        time.sleep(linger_s)
    os._exit(0)


def assert_case_passed(per_rank, cid):
    errors = [f"rank {r}: {res[cid]['error']}" for r, res in enumerate(per_rank)
              if res[cid]["error"]]
    assert not errors, "\n".join(errors)


def assert_peer_failure_raised(res, max_s):
    """Rank 1 raised its injected failure; rank 0 a RingTimeoutError naming it within max_s."""
    assert "injected failure on rank 1" in res[1]["peer_fails"]
    assert res[0]["peer_fails"].startswith("RingTimeoutError"), res[0]["peer_fails"]
    assert "receive from rank 1" in res[0]["peer_fails"], res[0]["peer_fails"]
    assert res[0]["peer_fails_s"] < max_s
