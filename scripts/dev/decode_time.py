"""Development timing of the paged decode default path, for A/B across two builds (run the two
builds' processes alternately; differences below ~0.5 us need several rounds): prints one line
per case with the median of R samples (each the median graph time of 20 calls).

    python scripts/dev/decode_time.py [--tag new] [--formats int8] [--ctx 32768,131072]
        [--batch 1] [--rounds 5]
"""
import argparse
import statistics

import torch

from longctx.bench.kvcache_suite import FORMATS, _decode_inputs, _graph_time
from longctx.kvcache import flash_attn_with_kvcache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="")
    ap.add_argument("--formats", default="int8")
    ap.add_argument("--ctx", default="32768,131072")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    for batch in [int(b) for b in args.batch.split(",")]:
        for ctx in [int(c) for c in args.ctx.split(",")]:
            for fmt in args.formats.split(","):
                q, kc, vc, ks, vs, table, seqlens, _ = _decode_inputs(fmt, FORMATS[fmt], batch,
                                                                      ctx)

                def call():
                    return flash_attn_with_kvcache(q, kc, vc, seqlens, table, k_scale=ks,
                                                   v_scale=vs, validate=False)
                t = [_graph_time(call) * 1e3 for _ in range(args.rounds)]
                print(f"{args.tag} {fmt} ctx {ctx} b{batch}: {statistics.median(t):.2f} us "
                      f"(min {min(t):.2f}, max {max(t):.2f})", flush=True)
                del q, kc, vc, ks, vs, table, seqlens
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
