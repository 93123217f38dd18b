"""Float64 RoPE reference and the PyTorch-at-input-precision version of it (for the
FlashAttention-3 style tolerance rule: our error <= 2 x PyTorch's error + a small atol)."""
import torch


def pair_indices(n_freq, interleaved):
    i = torch.arange(n_freq)
    return (2 * i, 2 * i + 1) if interleaved else (i, i + n_freq)


def rope_ref(x, positions, inv_freq, factor=1.0, interleaved=False, inverse=False,
             dtype=torch.float64):
    """x: (..., seq, heads, d) or (tokens, heads, d); positions broadcastable to x.shape[:-2].

    Angles are positions * inv_freq with the fp32 inv_freq values taken exactly (as the kernels
    do), evaluated in `dtype` (float64 for the reference)."""
    n = inv_freq.numel()
    pos = positions.to(torch.float64).expand(x.shape[:-2])
    ang = pos[..., None] * inv_freq.to(torch.float64)  # (..., n)
    if dtype != torch.float64:  # what PyTorch users write: fp32 angles
        ang = positions.float().expand(x.shape[:-2])[..., None] * inv_freq.float()
    cos = (ang.cos() * factor)[..., None, :].to(dtype)
    sin = (ang.sin() * factor)[..., None, :].to(dtype)
    if inverse:
        sin = -sin
    y = x.to(dtype).clone()
    a, b = pair_indices(n, interleaved)
    x1, x2 = x[..., a].to(dtype), x[..., b].to(dtype)
    y[..., a] = x1 * cos - x2 * sin
    y[..., b] = x2 * cos + x1 * sin
    return y
