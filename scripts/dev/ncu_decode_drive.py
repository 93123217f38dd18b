"""Driver for Nsight Compute on the paged decode (development): a batch-1 fp8 cache of CTX
tokens, eight decode calls (decode_stamps.run, the same setup the per-warp timelines use).
Example (bench/NOTES.md, session 4):
    ncu --clock-control none --cache-control none -k regex:decode_staged --launch-skip 5 \
        --launch-count 1 --section SpeedOfLight --section WarpStateStats \
        python3 scripts/dev/ncu_decode_drive.py 32768
"""
import sys

from decode_stamps import run  # scripts/dev is sys.path[0] when this file runs

run(int(sys.argv[1]), "fp8", 1, calls=8)
