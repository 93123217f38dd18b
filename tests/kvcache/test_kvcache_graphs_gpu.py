"""CUDA-graph capture of the KV-cache ops with validate=False (issue 24, item 5): decode, append
and chunked prefill captured once in a torch.cuda.CUDAGraph and replayed several times, new
contents written into the static inputs before each replay: new q, new k/v, advanced
cache_seqlens, and for the packed append a new split of its tokens among the sequences (cu_new).

Each replay is checked against an eager call on the same inputs from the same cache state: the
same kernels run, so the outputs and the pools (and int8 scales) after them must be bitwise
equal; a graph that baked a host-side value of its capture into a launch (lengths, page ids,
cu_new) fails at the first replay whose inputs differ. Attention outputs are also checked
against the float64 reference on the dequantized cache (FlashAttention-3's rule,
tests/support/attention_reference.py), so the replays compute the right thing, not only the
same thing. Caches: bf16, int8 and fp8.

The chunked prefill (more than 32 packed query rows per kv head) reads nothing on the host
while captured: it plans its key chunks on the device (one, several, and more than the eager
call's, empty ones included; a left window; packed queries; a mixed batch), and a page id outside
the pool gives NaN rows, not garbage. Those cases run in child processes: a capture that fails
part-way can leave this process's capture stream and caching-allocator routing in a state later
tests should not inherit.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longctx
from attention_reference import assert_fa3_close, attention_varlen_ref
from gpu_kernels import skip_unless_compiled
from kvcache_reference import gather_kv, keys_with_outliers

pytestmark = pytest.mark.gpu

BF16 = torch.bfloat16
FORMATS = {"bf16": BF16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}
H, HK, D, BS = 8, 2, 128, 16  # GQA 4: a decode step is 4 packed rows per kv head
EXIT_CAPTURE_REFUSED = 3
HERE = Path(__file__).resolve().parent
LONGCTX_PARENT = str(Path(longctx.__file__).resolve().parents[1])


class CaptureRefused(Exception):
    """The call ran eagerly but could not be captured in a CUDA graph."""


@pytest.fixture(autouse=True)
def _needs_kernels():  # a Hopper GPU and the kvcache kernels (its build report lists hdim128)
    skip_unless_compiled(D, BF16, families=("kvcache",))


def _cu(lens):
    return torch.tensor([0] + list(lens), dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _bits(t):
    """t viewed as integers of its element size (bitwise comparison, NaN included)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _as_tuple(x):
    return () if x is None else (tuple(x) if isinstance(x, (tuple, list)) else (x,))


def _write_random(gen, *tensors):
    """New contents for static input tensors, in place."""
    for t in tensors:
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))


class _Cache:
    """A paged cache on the GPU holding sequences of `lens` random tokens (appended eagerly,
    validated), with pages for `extra` more tokens per sequence in a random page order; seqlens
    is the static cache_seqlens tensor the graphs read."""

    def __init__(self, fmt, lens, extra, gen):
        batch = len(lens)
        max_blocks = -(-(max(lens) + extra) // BS)
        num_blocks = batch * max_blocks + 3
        perm = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks]
        self.table = perm.view(batch, max_blocks).to(torch.int32).cuda()
        self.k_cache = torch.zeros(num_blocks, BS, HK, D, dtype=FORMATS[fmt], device="cuda")
        self.v_cache = torch.zeros_like(self.k_cache)
        k0 = keys_with_outliers(sum(lens), HK, D, generator=gen).cuda()
        v0 = torch.randn(sum(lens), HK, D, generator=gen).to(BF16).cuda()
        self.scales = {}
        if fmt == "int8":
            self.scales = {n: longctx.int8_scales(num_blocks, BS, HK, "cuda")
                           for n in ("k_scale", "v_scale")}
        elif fmt == "fp8":  # headroom for the new tokens
            self.scales = {"k_scale": longctx.fp8_scales_from_data(k0, margin=2.0),
                           "v_scale": longctx.fp8_scales_from_data(v0, margin=2.0)}
        longctx.kvcache_append(k0, v0, self.k_cache, self.v_cache,
                               torch.zeros(batch, dtype=torch.int32, device="cuda"), self.table,
                               cu_new=_cu(lens).cuda(), **self.scales)
        self.seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        self.int8 = fmt == "int8"

    def state(self):
        """What an append writes: the pools and the int8 scales."""
        return [self.k_cache, self.v_cache] + (list(self.scales.values()) if self.int8 else [])

    def snapshot(self):
        return [t.clone() for t in self.state()]

    def restore(self, snap):
        for t, s in zip(self.state(), snap):
            t.copy_(s)

    def set_lengths(self, lens):
        self.seqlens.copy_(torch.tensor(lens, dtype=torch.int32))

    def dequantized(self, totals):
        """float64 K and V of the first totals[b] tokens of every sequence, packed."""
        kc, vc, table = self.k_cache.cpu(), self.v_cache.cpu(), self.table.cpu()
        ks, vs = ((self.scales["k_scale"].cpu(), self.scales["v_scale"].cpu())
                  if self.scales else (None, None))
        deq = [gather_kv(kc, vc, table, n, b, ks, vs) for b, n in enumerate(totals)]
        return torch.cat([x[0] for x in deq]), torch.cat([x[1] for x in deq])


def _capture(fn):
    """fn warmed up on a side stream (allocator, lazy initialization), then captured; returns
    (graph, fn's outputs as a tuple: the tensors each replay rewrites). An error raised while
    capturing (fn has just run eagerly) is CaptureRefused."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except Exception as e:  # e.g. a host read of a device tensor during the capture
        raise CaptureRefused(f"{type(e).__name__}: {e}") from e
    return graph, _as_tuple(out)


def _replay_then_eager(cache, graph, graph_out, eager):
    """One replay and one eager call from the same cache state; the cache state after them must
    be bitwise equal. Returns (the replay's outputs, the eager call's); the cache holds the state
    after the call."""
    before = cache.snapshot()
    graph.replay()
    torch.cuda.synchronize()
    got = [t.clone() for t in graph_out]
    after_graph = cache.snapshot()
    cache.restore(before)
    want = _as_tuple(eager())
    torch.cuda.synchronize()
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(after_graph, cache.state())):
        assert torch.equal(_bits(a), _bits(b)), f"cache tensor {i}: replay wrote other bytes"
    return got, want


def _replay_equals_eager(cache, graph, graph_out, eager, bitwise=True):
    """_replay_then_eager with the outputs bitwise equal, or (bitwise=False: a replay that runs
    other kernels than the eager call, a mixed batch) within the forward's tolerance of each
    other. Returns the replay's outputs."""
    got, want = _replay_then_eager(cache, graph, graph_out, eager)
    for name, a, b in zip(("out", "lse"), got, want):
        if bitwise:
            assert torch.equal(_bits(a), _bits(b)), f"{name}: replay differs from the eager call"
        else:
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=name)
    return got


def _check_reference(cache, q, totals, out, lse, rows=None, window_left=-1):
    """out and lse of q over the first totals[b] cached tokens (bottom-right causal, window_left
    keys to the left) against the float64 reference on the dequantized cache. q (batch, sq, H, D)
    with lse (batch, H, sq), or packed (total, H, D) with rows[b] rows per sequence and lse
    (H, total)."""
    kd, vd = cache.dequantized(totals)
    if rows is None:
        batch, sq = q.shape[:2]
        rows = [sq] * batch
        q, out, lse = q.flatten(0, 1), out.flatten(0, 1), lse.permute(1, 0, 2).flatten(1, 2)
    qf = q.cpu()
    cq, ck = _cu(rows), _cu(totals)
    window = (window_left, 0)
    out64, lse64 = attention_varlen_ref(qf.double(), kd, vd, cq, ck, None, True, window)
    out_pt, lse_pt = attention_varlen_ref(qf, kd.to(BF16), vd.to(BF16), cq, ck, None, True,
                                          window, upcast=False)
    assert_fa3_close("out", out.cpu(), out64, out_pt, BF16)
    assert_fa3_close("lse", lse.cpu(), lse64, lse_pt, BF16)


# ---- decode ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("fused", [True, False], ids=["kv-in-call", "append-then-decode"])
def test_decode_graph_replays_equal_eager(fmt, fused):
    """A decode step captured once: the new token's K/V appended (inside flash_attn_with_kvcache,
    or by kvcache_append before it with the lengths + 1 computed on the device) and one query
    per sequence attending over the cache. Five replays with new q, k, v and lengths advanced by
    one (a sequence starting empty, one crossing a page edge, long ones)."""
    gen = torch.Generator().manual_seed(31)
    lens, steps = [0, 15, 700, 2500], 5
    cache = _Cache(fmt, lens, steps, gen)
    batch = len(lens)
    q = torch.empty(batch, 1, H, D, dtype=BF16, device="cuda")
    k = torch.empty(batch, 1, HK, D, dtype=BF16, device="cuda")
    v = torch.empty_like(k)
    kw = dict(causal=True, return_lse=True, validate=False, **cache.scales)
    kc, vc, table = cache.k_cache, cache.v_cache, cache.table

    def step():
        if fused:
            return longctx.flash_attn_with_kvcache(q, kc, vc, cache.seqlens, table, k=k, v=v,
                                                   **kw)
        longctx.kvcache_append(k, v, kc, vc, cache.seqlens, table, validate=False,
                               **cache.scales)
        return longctx.flash_attn_with_kvcache(q, kc, vc, cache.seqlens + 1, table, **kw)

    _write_random(gen, q, k, v)
    graph, graph_out = _capture(step)
    for i in range(steps):
        _write_random(gen, q, k, v)
        cache.set_lengths([n + i for n in lens])
        out, lse = _replay_equals_eager(cache, graph, graph_out, step)
        _check_reference(cache, q, [n + i + 1 for n in lens], out, lse)


# ---- append ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_append_graph_replays_equal_eager(fmt):
    """kvcache_append of 12 packed new tokens with RoPE on K (cache positions, computed on the
    device) captured once; every replay splits them differently among the sequences (cu_new,
    empty sequences included) at the lengths the previous replays left."""
    gen = torch.Generator().manual_seed(32)
    lens = [3, 16, 500]
    splits = [[4, 4, 4], [12, 0, 0], [0, 5, 7], [1, 10, 1]]
    total = sum(splits[0])
    assert all(sum(s) == total for s in splits)
    cache = _Cache(fmt, lens, total * len(splits), gen)
    k = torch.empty(total, HK, D, dtype=BF16, device="cuda")
    v = torch.empty_like(k)
    cu_new = _cu(splits[0]).cuda()
    rf = longctx.rope_frequencies(D, base=500000.0)
    rope = (rf.inv_freq.cuda(), rf.attention_factor)

    def step():
        longctx.kvcache_append(k, v, cache.k_cache, cache.v_cache, cache.seqlens, cache.table,
                               cu_new=cu_new, rope=rope, validate=False, **cache.scales)

    _write_random(gen, k, v)
    cache.set_lengths(lens)
    graph, graph_out = _capture(step)
    assert graph_out == ()
    for split in splits:
        _write_random(gen, k, v)
        cu_new.copy_(_cu(split))
        cache.set_lengths(lens)
        before = cache.snapshot()
        _replay_equals_eager(cache, graph, graph_out, step)
        changed = [not torch.equal(_bits(a), _bits(b)) for a, b in zip(before, cache.state())]
        assert all(changed), "a replay wrote nothing"
        lens = [n + s for n, s in zip(lens, split)]


# ---- chunked prefill --------------------------------------------------------------------------
# Captured, the prefill reads nothing on the host: it plans its key chunks on the device, its
# buffers sized by the block table's capacity (DeviceChunkPlan, csrc/kvcache/kvcache_cuda.cu);
# an eager call plans them from the lengths it reads. Both gather the same keys into each chunk,
# and a captured chunk past a sequence's keys folds as an exact no-op, so replays equal eager
# calls bitwise, except where the eager call splits a mixed batch (decode rows on the decode
# kernels), which a capture cannot: there the replay is checked against the reference only.

# name: (cache lengths, spare capacity per sequence, window_left, query rows per sequence (None:
# 64 each, (batch, seqlen_q) queries), steps)
PREFILL_CASES = {
    "short": ([0, 100], 0, -1, None, 4),  # one chunk both ways; a sequence starting empty
    "spare": ([300, 5000], 70000, -1, None, 2),  # eager: one chunk; captured: three
    "long": ([3000, 40000], 0, -1, None, 2),  # two chunks both ways, sequence 0's second empty
    "window": ([200, 9000], 0, 1000, None, 2),  # only the window's keys gathered
    "packed": ([50, 3000], 0, -1, [64, 40], 2),  # cu_seqlens_q
    "mixed": ([2000, 700, 3000], 0, -1, [1, 64, 40], 2),  # a decode row first (eager splits)
}


@pytest.mark.parametrize("case", list(PREFILL_CASES))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_chunked_prefill_graph_replays_equal_eager(fmt, case):
    skip_unless_compiled(D, BF16)  # the prefill runs the forward kernel
    if fmt != "bf16" and case not in ("short", "long"):
        pytest.skip("the chunk plan does not depend on the format: bf16 covers it")
    _run_isolated("chunked_prefill", fmt, case)


def test_chunked_prefill_graph_invalid_page_gives_nan():
    skip_unless_compiled(D, BF16)
    _run_isolated("invalid_page")


def _prefill_inputs(batch, rows, chunk):
    """Empty q, k, v (and cu_seqlens_q, max_seqlen_q for packed rows) of one prefill step."""
    if rows is None:
        q = torch.empty(batch, chunk, H, D, dtype=BF16, device="cuda")
        k = torch.empty(batch, chunk, HK, D, dtype=BF16, device="cuda")
        return q, k, torch.empty_like(k), {}
    q = torch.empty(sum(rows), H, D, dtype=BF16, device="cuda")
    k = torch.empty(sum(rows), HK, D, dtype=BF16, device="cuda")
    packed = dict(cu_seqlens_q=_cu(rows).cuda(), max_seqlen_q=max(rows))
    return q, k, torch.empty_like(k), packed


def _chunked_prefill_case(fmt, case):
    """New tokens (64 per sequence, or the packed rows) appended in the call and attended over
    the cache, captured once; replays with new q, k, v and the lengths advanced by the rows."""
    lens, spare, window_left, rows, steps = PREFILL_CASES[case]
    gen = torch.Generator().manual_seed(33)
    chunk = 64
    new = rows or [chunk] * len(lens)
    cache = _Cache(fmt, lens, max(new) * steps + spare, gen)
    q, k, v, packed = _prefill_inputs(len(lens), rows, chunk)

    def step():
        return longctx.flash_attn_with_kvcache(q, cache.k_cache, cache.v_cache, cache.seqlens,
                                               cache.table, k=k, v=v, causal=True,
                                               window_size=(window_left, -1), return_lse=True,
                                               validate=False, **packed, **cache.scales)

    _write_random(gen, q, k, v)
    graph, graph_out = _capture(step)
    for i in range(steps):
        _write_random(gen, q, k, v)
        at = [n + r * i for n, r in zip(lens, new)]
        cache.set_lengths(at)
        out, lse = _replay_equals_eager(cache, graph, graph_out, step, bitwise=case != "mixed")
        _check_reference(cache, q, [n + r for n, r in zip(at, new)], out, lse, rows,
                         window_left)


def _invalid_page_case():
    """A captured prefill (validate=False) replayed after a page id of sequence 1 was set
    outside the pool: sequence 1's rows, which all see that page's keys, are NaN; sequence 0's
    rows are bitwise what the replay with the valid table gave."""
    gen = torch.Generator().manual_seed(34)
    cache = _Cache("bf16", [300, 2000], 0, gen)
    q = torch.randn(2, 64, H, D, generator=gen).to(BF16).cuda()

    def step():
        return longctx.flash_attn_with_kvcache(q, cache.k_cache, cache.v_cache, cache.seqlens,
                                               cache.table, causal=True, return_lse=True,
                                               validate=False)

    graph, (out, lse) = _capture(step)
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_lse = out.clone(), lse.clone()
    cache.table[1, 5] = cache.k_cache.shape[0] + 7
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(_bits(out[0]), _bits(want_out[0]))
    assert torch.equal(_bits(lse[0]), _bits(want_lse[0]))
    assert torch.isfinite(want_out).all() and torch.isfinite(want_lse).all()
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1]).all()


# ---- running a case in a child process --------------------------------------------------------

_ISOLATED = {"chunked_prefill": _chunked_prefill_case, "invalid_page": _invalid_page_case}


def _isolated_main(argv):
    """The child's entry: runs _ISOLATED[argv[0]](*argv[1:]); exit status EXIT_CAPTURE_REFUSED
    when the capture is refused, 0 when the case passes (a traceback and 1 otherwise)."""
    try:
        _ISOLATED[argv[0]](*argv[1:])
    except CaptureRefused as e:
        print(f"capture refused: {e}", flush=True)
        return EXIT_CAPTURE_REFUSED
    return 0


def _run_isolated(case, *args):
    """Runs an _ISOLATED case in a fresh Python process (this longctx, tests/support and this
    folder on its path); raises CaptureRefused or AssertionError with the child's output."""
    env = dict(os.environ)
    paths = [LONGCTX_PARENT, str(HERE.parent / "support"), str(HERE)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                 else []))
    # os._exit: no interpreter shutdown (destructors after a refused capture) to change the status
    code = (f"import os, sys, {Path(__file__).stem} as m\n"
            "rc = m._isolated_main(sys.argv[1:])\n"
            "sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, case, *args], capture_output=True, text=True,
                       env=env, timeout=600)
    tail = (p.stdout + p.stderr)[-4000:]
    if p.returncode == EXIT_CAPTURE_REFUSED:
        raise CaptureRefused(tail)
    assert p.returncode == 0, f"{case} {args} failed in its process (exit {p.returncode}):\n{tail}"
