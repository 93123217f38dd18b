"""Step-by-step smoke test of the installed extension on a GPU machine (prints each step, so a
crash shows where it happened). Run with python -X faulthandler."""
import torch
print("torch", torch.__version__, flush=True)
import longctx
print("import ok", longctx.build_info()["kernels"], flush=True)
from longctx import _C
_C.nvtx_push("diag"); _C.nvtx_pop(); print("nvtx ok", flush=True)
inv, f = longctx.rope_frequencies(128)
q = torch.randn(4, 8, 128); k = torch.randn(4, 2, 128); pos = torch.arange(4)
longctx.apply_rope(q, k, pos, inv, f); print("cpu rope ok", flush=True)
qc, kc, pc, ic = q.cuda(), k.cuda(), pos.cuda(), inv.cuda()
torch.ops.longctx.apply_rope_(qc, kc, pc, ic, 1.0, False, False, -1); torch.cuda.synchronize()
print("cuda rope_ ok", flush=True)
torch.ops.longctx.apply_rope_(qc, kc, pc, ic, 1.0, False, False, 10); torch.cuda.synchronize()
print("cuda rope_ with range check ok", flush=True)
a, b = torch.ops.longctx.apply_rope(qc, kc, pc, ic, 1.0, False, False, -1); torch.cuda.synchronize()
print("cuda functional ok", flush=True)
