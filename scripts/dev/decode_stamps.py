"""Per-warp timeline of the staged 8-bit decode kernel (development, bench/NOTES.md session 5).
Needs a build with LONGCTX_DECODE_STAMPS defined at the top of kvcache_decode_staged.cuh (the
kernel then printf's one line per warp). Usage:
    python3 scripts/dev/decode_stamps.py run CTX [fp8|int8] [BATCH] > stamps.txt
    python3 scripts/dev/decode_stamps.py parse stamps.txt
`run` makes CALLS decode calls (synchronized, so launches do not overlap); `parse` takes the
last launch and reports, in ns: the kernel's span (first warp start to last warp end), the
spread of warp start times, and per phase the mean over warps of: prologue (entry -> key range
known), page ids + copies issued, first tile landed, loop, finish; plus waiting for copies and
computing inside the loop. SM clocks are converted with the rate measured over the warps.
"""
import sys


def run(ctx, fmt="fp8", batch=1, calls=4):
    import torch
    from longctx.bench.kvcache_suite import D, H, _fill_quantized
    from longctx.kvcache import flash_attn_with_kvcache
    dt = torch.float8_e4m3fn if fmt == "fp8" else torch.int8
    kc, vc, ks, vs, table, seqlens, _ = _fill_quantized(dt, batch, ctx)
    q = torch.randn(batch, 1, H, D, device="cuda", dtype=torch.bfloat16)
    for _ in range(calls):
        flash_attn_with_kvcache(q, kc, vc, seqlens, table, k_scale=ks, v_scale=vs, validate=False)
        torch.cuda.synchronize()


def parse(path):
    rows, extra = [], {}
    for line in open(path):
        if line.startswith("ST "):
            v = line.split()[1:]
            rows.append([int(x) for x in v])
        elif line.startswith("SX "):
            v = [int(x) for x in line.split()[1:]]
            extra[tuple(v[:4])] = v[4:]
    # launches: warps whose start lies > 20 us after the previous warp start begin a new one
    rows.sort(key=lambda r: r[6])
    launches, cur = [], [rows[0]]
    for r in rows[1:]:
        if r[6] - cur[-1][6] > 20000:
            launches.append(cur)
            cur = []
        cur.append(r)
    launches.append(cur)
    L = launches[-1]
    print(f"{len(launches)} launches, last has {len(L)} warps")
    g0 = min(r[6] for r in L)
    span = max(r[7] for r in L) - g0
    # SM clock rate: cycles over ns of each warp's lifetime
    rate = sorted(r[12] / max(1, r[7] - r[6]) for r in L)[len(L) // 2]
    ns = lambda cyc: cyc / rate
    starts = sorted(r[6] - g0 for r in L)
    ends = sorted(r[7] - g0 for r in L)
    print(f"kernel span {span} ns; clock {rate:.3f} GHz; warp starts 0..{starts[-1]} ns "
          f"(median {starts[len(starts)//2]}), ends {ends[0]}..{ends[-1]} ns")
    n = len(L)
    mean = lambda f: sum(f(r) for r in L) / n
    tiles = mean(lambda r: r[5])
    ph = [("entry -> key range (seqlens, q)", lambda r: ns(r[8])),
          ("page ids + S copies issued", lambda r: ns(r[9] - r[8])),
          ("first tile landed", lambda r: ns(r[10] - r[9])),
          ("rest of the loop", lambda r: ns(r[11] - r[10])),
          ("wait for the CTA's other warps", lambda r: ns(r[15] - r[11])),
          ("combine + store", lambda r: ns(r[12] - r[15])),
          ("  loop: waiting for copies", lambda r: ns(r[13])),
          ("  loop: reading + computing", lambda r: ns(r[14])),
          ("lifetime", lambda r: ns(r[12]))]
    print(f"mean tiles per warp {tiles:.1f}")
    if extra:  # SX: clocks when cache_seqlens is loaded, after the grid dependency wait, and
        # from the copies issued to the query's row sum done (int8 key bias)
        ph += [("  entry -> seqlens loaded", lambda r: ns(extra[tuple(r[:4])][0])),
               ("  entry -> grid dependency wait done", lambda r: ns(extra[tuple(r[:4])][1])),
               ("  copies issued -> query row sum", lambda r: ns(extra[tuple(r[:4])][2]))]
    for name, f in ph:
        vals = sorted(f(r) for r in L)
        print(f"{name:36s} mean {mean(f):8.0f}  min {vals[0]:8.0f}  max {vals[-1]:8.0f}")
    print(f"compute per tile {mean(lambda r: ns(r[14])) / max(tiles, 1e-9):.0f} ns")
    # time line: how many warps are alive at each 1 us
    alive = [sum(1 for r in L if r[6] - g0 <= t < r[7] - g0) for t in range(0, span, 1000)]
    print("alive warps per us:", " ".join(map(str, alive)))


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(int(sys.argv[2]), *(sys.argv[3:4] or ["fp8"]), *[int(x) for x in sys.argv[4:5]])
    else:
        parse(sys.argv[2])
