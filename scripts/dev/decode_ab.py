"""Development A/B of the paged decode: the default against one environment switch, alternated
R times in one process (each sample the median graph time of 20 calls), so that drift between
the two is not mistaken for a difference. Prints the medians and the paired differences.

    python scripts/dev/decode_ab.py --env NAME=VAL[,NAME=VAL] [--formats int8,fp8]
        [--ctx 32768] [--batch 1] [--rounds 15]
    python scripts/dev/decode_ab.py --slot-scales ...   (B: the int8 scales stored slot-major,
        contiguous, instead of the default head-major; int8 only)
"""
import argparse
import os
import statistics

import torch

from longctx.bench.kvcache_suite import FORMATS, _decode_inputs, _graph_time
from longctx.kvcache import flash_attn_with_kvcache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--env", default="")
    ap.add_argument("--slot-scales", action="store_true")
    ap.add_argument("--formats", default="int8,fp8")
    ap.add_argument("--ctx", default="32768")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    pairs = [kv.split("=", 1) for kv in args.env.split(",") if kv]
    label = args.env + (" slot-major scales" if args.slot_scales else "")
    for ctx in [int(c) for c in args.ctx.split(",")]:
        for fmt in args.formats.split(","):
            q, kc, vc, ks, vs, table, seqlens, _ = _decode_inputs(fmt, FORMATS[fmt], args.batch,
                                                                  ctx)

            def call():
                return flash_attn_with_kvcache(q, kc, vc, seqlens, table, k_scale=ks,
                                               v_scale=vs, validate=False)
            ks_b, vs_b = (ks.contiguous(), vs.contiguous()) if args.slot_scales else (ks, vs)

            def call_b():
                return flash_attn_with_kvcache(q, kc, vc, seqlens, table, k_scale=ks_b,
                                               v_scale=vs_b, validate=False)
            a, b = [], []
            for _ in range(args.rounds):
                a.append(_graph_time(call) * 1e3)
                for k, v in pairs:
                    os.environ[k] = v
                try:
                    b.append(_graph_time(call_b) * 1e3)
                finally:
                    for k, _ in pairs:
                        os.environ.pop(k, None)
            d = [y - x for x, y in zip(a, b)]
            print(f"{fmt} ctx {ctx} b{args.batch}: default {statistics.median(a):.2f} us, "
                  f"{label} {statistics.median(b):.2f} us, paired diff median "
                  f"{statistics.median(d):+.2f} us (min {min(d):+.2f}, max {max(d):+.2f}, "
                  f"{sum(x > 0 for x in d)}/{len(d)} positive)", flush=True)
            del q, kc, vc, ks, vs, ks_b, vs_b, table, seqlens
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
