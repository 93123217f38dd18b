"""`python -m longctx ...`: the same command as the `longctx` console script (longctx.cli)."""
import sys

from .cli import main

sys.exit(main())
