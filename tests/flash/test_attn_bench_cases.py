"""CPU tests of the attention benchmarks' cases (longctx.bench.attn_cases): the grids hold the
cases the issues measure, the FLOP counts match a brute-force count of the mask, document-packed
batches are well formed. The timing itself needs a GPU (bench/attn_fwd.py, bench/attn_bwd.py).
"""
import argparse

import pytest

from attention_reference import visible_mask
from longctx.bench import attn_bwd_suite, attn_fwd_suite
from longctx.bench.attn_cases import (Case, bwd_grid, case_pairs, cu_seqlens, document_lengths,
                                      fwd_flops, fwd_grid, mask_pairs, select, throughput,
                                      wants_flex)


@pytest.mark.parametrize("sq,sk", [(1, 1), (7, 7), (5, 13), (13, 5), (64, 64), (33, 100)])
@pytest.mark.parametrize("causal,left", [(False, -1), (True, -1), (True, 0), (True, 6),
                                         (False, 3)])
def test_mask_pairs_counts_the_mask(sq, sk, causal, left):
    vis = visible_mask(sq, sk, causal, (left, -1))
    assert mask_pairs(sq, sk, causal, left) == int(vis.sum())


def test_document_lengths():
    docs = document_lengths(65536)
    assert sum(docs) == 65536 and all(n >= 1 for n in docs)
    assert all(n <= 16384 for n in docs) and len(docs) >= 8
    assert min(docs[:-1]) >= 128  # only the last one is trimmed
    assert document_lengths(65536) == docs  # deterministic
    assert document_lengths(65536, seed=1) != docs
    assert cu_seqlens(docs)[-1] == 65536 and cu_seqlens([3, 0, 2]) == [0, 3, 3, 5]


def test_packed_case_counts_pairs_per_document():
    c = Case(64, 30, True, -1, 4, 2, 1, (10, 20))
    assert case_pairs(c) == 55 + 210
    assert fwd_flops(c) == 4 * 4 * (55 + 210) * 64
    batched = Case(64, 20, True, -1, 4, 2, 3)
    assert case_pairs(batched) == 3 * 210


def test_grids_hold_the_issue_cases():
    fwd, bwd = fwd_grid(False), bwd_grid(False)
    one_seq = lambda grid, s: [c for c in grid if c.seqlen == s and c.batch == 1 and not c.docs]
    assert one_seq(fwd, 131072) == [Case(128, 131072, True, -1, 32, 8, 1)]
    assert one_seq(bwd, 65536) == [Case(128, 65536, True, -1, 32, 8, 1)]
    assert one_seq(bwd, 131072)  # the backward's peak memory at 128K
    for grid in (fwd, bwd):
        packed = [c for c in grid if c.docs]
        assert len(packed) == 1 and packed[0].causal and packed[0].heads_kv == 8
        assert sum(packed[0].docs) == packed[0].seqlen and wants_flex(packed[0])
        batched = [c for c in grid if not c.docs and c.seqlen <= 32768]
        assert {c.hdim for c in batched} == {64, 128, 256}
        assert all(c.batch * c.seqlen == 32768 for c in batched)
        assert [c.seqlen for c in batched if c.window_left == 4096] == [16384, 32768]
    assert len({c.tag for c in fwd}) == len(fwd) and len({c.tag for c in bwd}) == len(bwd)
    assert len(fwd_grid(True)) == 2


def test_select_and_rows():
    grid = fwd_grid(False)
    picked = select(grid, ["docs=", "s=131072"])
    assert len(picked) == 2 and select(grid, []) == grid
    row = picked[0].as_row() if picked[0].docs else picked[1].as_row()
    assert row["docs"] == len(row["doc_lengths"]) and row["window"] == [-1, 0]
    assert set(Case(128, 1024, False, -1, 16, 16, 32).as_row()) == {
        "hdim", "seqlen", "batch", "heads", "heads_kv", "causal", "window", "dtype"}


@pytest.mark.parametrize("suite", [attn_fwd_suite, attn_bwd_suite])
def test_suites_take_only(suite):
    ap = argparse.ArgumentParser()
    suite.add_arguments(ap)
    args = ap.parse_args(["--only", "s=131072,docs=", "--no-flex"])
    assert args.only == "s=131072,docs=" and args.no_flex


def test_throughput_fields():
    row = throughput(2e12, 4.0, {"sdpa_cudnn": 5.0, "flex": None}, prefix="fb_")
    assert row["fb_tflops"] == pytest.approx(500.0)
    assert row["fb_peer_tflops"] == {"sdpa_cudnn": pytest.approx(400.0), "flex": None}
    assert row["fb_ratio"] == {"sdpa_cudnn": pytest.approx(1.25), "flex": None}
