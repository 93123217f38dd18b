"""Which attention blocks a rank computes at one ring step, and with which mask.

At step i rank r holds its own queries and the keys/values of rank src = (r - i) mod N. The mask
over the full sequence (length S, so no bottom-right shift) says query position gi sees key
position gj iff  gj - gi >= -left  (left >= 0)  and  gj - gi <= right  (right >= 0; causal is
right = 0). This module turns that into calls of the existing ops (flash_attn_fwd/bwd), whose
mask is bottom-right aligned on the block they are given.

The rule, from global positions. Take a local rectangle of q rows x kv rows. For a q segment a and
a kv segment b inside it (segments are runs contiguous both locally and globally, layout.py), with
delta_ab = (global_start - local_start of a) - (global_start - local_start of b), row r sees
column t iff  t - r  lies in the band  [delta_ab - left, delta_ab + right]  (local coordinates).
If one band [L, H] reproduces every sub-block's visible set, the rectangle is one call:
1. trim it to the rows and columns that see anything: rows [max(0,-H), min(R-1, C-1-L)], columns
   [max(0, L), min(C-1, R-1+H)] (empty: skip the block);
2. with (r1, t1) the trimmed rectangle's end (exclusive), the op's bottom-right aligned mask
   (row r' sees t' iff  t' - r' in [s - wl, s + wr],  s = sk' - sq') equals the band for
       window_left = (t1 - r1) - L,    window_right = H - (t1 - r1),
   which are >= 0 after trimming (the end corner lies in the band);
3. a bound that excludes nothing in the trimmed rectangle becomes -1 (unbounded): both -1 is a
   fully visible block (non-causal call), window_right == 0 with no left bound is a diagonal
   (causal) block, anything else a windowed call.
plan_step tries the whole rectangle first, then one call per q segment or per kv segment, then
one per pair, and keeps the option with the fewest calls. For zigzag under a causal mask this
gives ring-flash-attention's schedule: step 0 one causal call over the whole shard, later steps
one non-causal call (all q x first kv chunk, or second q chunk x all kv).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

from .layout import Segment, local_segments

INF = float("inf")


class Block(NamedTuple):
    """One op call: local q rows [q0, q1) against local kv rows [k0, k1)."""
    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    window_left: int   # op arguments: -1 unbounded
    window_right: int  # 0 when causal

    @property
    def pairs(self) -> int:
        """How many (query, key) pairs the block's mask keeps (for FLOP counts)."""
        sq, sk = self.q1 - self.q0, self.k1 - self.k0
        s = sk - sq
        lo = -sq if self.window_left < 0 else s - self.window_left
        hi = sk - 1 if self.window_right < 0 else s + self.window_right
        if self.window_left < 0 and self.window_right < 0:
            return sq * sk
        return sum(max(0, min(sk - 1, r + hi) - max(0, r + lo) + 1) for r in range(sq))


def _band(left: int, right: int, causal: bool) -> Tuple[float, float]:
    """Allowed range of (key position - query position) over the full sequence."""
    lo = -INF if left < 0 else -left
    hi = 0 if causal else (INF if right < 0 else right)
    return lo, hi


def _clip(lo, hi, rows: Tuple[int, int], cols: Tuple[int, int]):
    """The band's t - r values that occur in the sub-rectangle rows x cols (None: empty)."""
    dmin, dmax = cols[0] - (rows[1] - 1), (cols[1] - 1) - rows[0]
    a, b = max(lo, dmin), min(hi, dmax)
    return (a, b) if a <= b else None


def _uniform_band(subs) -> Optional[Tuple[float, float]]:
    """One band [L, H] giving every sub-block its visible set, or None if there is none.

    subs: (rows, cols, lo, hi) per sub-block in the rectangle's local coordinates.
    """
    wanted = [_clip(lo, hi, rows, cols) for rows, cols, lo, hi in subs]
    cand_lo, cand_hi = {-INF}, {INF}
    for (rows, cols, _, _), w in zip(subs, wanted):
        if w is not None:
            cand_lo.add(w[0])
            cand_hi.add(w[1])
        else:  # an empty sub-block may need a bound just past it
            cand_lo.add(cols[1] - 1 - rows[0] + 1)
            cand_hi.add(cols[0] - (rows[1] - 1) - 1)
    for L in sorted(cand_lo):
        for H in sorted(cand_hi):
            if all(_clip(L, H, rows, cols) == w for (rows, cols, _, _), w in zip(subs, wanted)):
                return L, H
    return None


def _block(L, H, q0: int, q1: int, k0: int, k1: int) -> Optional[Block]:
    """The op call for the band [L, H] (coordinates relative to (q0, k0)) on rows x cols."""
    R, C = q1 - q0, k1 - k0
    r_lo, r_hi = max(0, -H), min(R - 1, C - 1 - L)
    t_lo, t_hi = max(0, L), min(C - 1, R - 1 + H)
    if L > H or r_lo > r_hi or t_lo > t_hi:
        return None
    r_lo, r_hi, t_lo, t_hi = int(r_lo), int(r_hi), int(t_lo), int(t_hi)
    r1, t1 = r_hi + 1, t_hi + 1
    sq, sk = r1 - r_lo, t1 - t_lo
    wl = -1 if L == -INF else int((t1 - r1) - L)
    wr = -1 if H == INF else int(H - (t1 - r1))
    assert wl >= -1 and wr >= -1, (L, H, q0, q1, k0, k1)
    if wl >= sk - 1:  # the lower bound excludes nothing
        wl = -1
    if wr >= sq - 1:  # the upper bound excludes nothing
        wr = -1
    return Block(q0 + r_lo, q0 + r1, k0 + t_lo, k0 + t1, wr == 0, wl, wr)


def _rect(qsegs: Sequence[Segment], ksegs: Sequence[Segment], lo, hi):
    """Blocks for the rectangle spanned by qsegs x ksegs: [] (nothing visible), [block], or None
    (not one band)."""
    q0, k0 = qsegs[0].local_start, ksegs[0].local_start
    q1 = qsegs[-1].local_start + qsegs[-1].length
    k1 = ksegs[-1].local_start + ksegs[-1].length
    subs = []
    for a in qsegs:
        for b in ksegs:
            rows = (a.local_start - q0, a.local_start - q0 + a.length)
            cols = (b.local_start - k0, b.local_start - k0 + b.length)
            # key - query in global positions = (t - r) + offset for rectangle coordinates (r, t)
            offset = (b.global_start - cols[0]) - (a.global_start - rows[0])
            subs.append((rows, cols, lo - offset, hi - offset))
    band = _uniform_band(subs)
    if band is None:
        return None
    blk = _block(band[0], band[1], q0, q1, k0, k1)
    return [] if blk is None else [blk]


def plan_blocks(qsegs: Sequence[Segment], ksegs: Sequence[Segment], causal: bool,
                window_size=(-1, -1)) -> List[Block]:
    """The fewest op calls covering exactly the visible (query, key) pairs of qsegs x ksegs."""
    lo, hi = _band(int(window_size[0]), int(window_size[1]), causal)
    whole = _rect(qsegs, ksegs, lo, hi)
    if whole is not None:
        return whole
    by_rows, by_cols = [], []
    for a in qsegs:
        r = _rect([a], ksegs, lo, hi)
        by_rows += r if r is not None else sum((_rect([a], [b], lo, hi) for b in ksegs), [])
    for b in ksegs:
        c = _rect(qsegs, [b], lo, hi)
        by_cols += c if c is not None else sum((_rect([a], [b], lo, hi) for a in qsegs), [])
    return min((by_rows, by_cols), key=len)


def plan_step(rank: int, src: int, world_size: int, local_seqlen: int, layout: str,
              causal: bool, window_size=(-1, -1)) -> List[Block]:
    """Blocks rank computes with the keys/values of rank src (local coordinates of each)."""
    qsegs = local_segments(rank, world_size, local_seqlen, layout)
    ksegs = local_segments(src, world_size, local_seqlen, layout)
    return plan_blocks(qsegs, ksegs, causal, window_size)
