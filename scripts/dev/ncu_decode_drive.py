"""Driver for Nsight Compute on the paged decode (development): a batch-1 fp8 cache of CTX
tokens, eight decode calls. Example (bench/NOTES.md, session 4):
    ncu --clock-control none --cache-control none -k regex:decode_staged --launch-skip 5 \
        --launch-count 1 --section SpeedOfLight --section WarpStateStats \
        python3 scripts/dev/ncu_decode_drive.py 32768
"""
import sys, torch
from longctx.bench.kvcache_suite import D, H, _fill_quantized
from longctx.kvcache import flash_attn_with_kvcache
ctx = int(sys.argv[1])
kc, vc, ks, vs, table, seqlens, _ = _fill_quantized(torch.float8_e4m3fn, 1, ctx)
q = torch.randn(1, 1, H, D, device="cuda", dtype=torch.bfloat16)
for _ in range(8):
    flash_attn_with_kvcache(q, kc, vc, seqlens, table, k_scale=ks, v_scale=vs, validate=False)
torch.cuda.synchronize()
