import sys, torch
from longctx.bench.kvcache_suite import BS, D, H, HK, _fill_quantized
from longctx.kvcache import flash_attn_with_kvcache
ctx = int(sys.argv[1])
kc, vc, ks, vs, table, seqlens, _ = _fill_quantized(torch.float8_e4m3fn, 1, ctx)
q = torch.randn(1, 1, H, D, device="cuda", dtype=torch.bfloat16)
for _ in range(8):
    flash_attn_with_kvcache(q, kc, vc, seqlens, table, k_scale=ks, v_scale=vs, validate=False)
torch.cuda.synchronize()
