#!/usr/bin/env python
"""Write a tiny randomly initialised Cellpose 4 (CPSAM) model file, for testing the Cellpose path offline.

    python scripts/make_tiny_cpsam.py tiny_cpsam.pt [--dim 32 --depth 2 --heads 2]
    embedkit segment FIELDS --out S.h5 --model tiny_cpsam.pt --flow-threshold 0

Its masks are arbitrary; it exercises loading, tiling and mask computation, not segmentation quality.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedkit.segment.cellpose_backend import save_random_cpsam  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dim", type=int, default=32, help="encoder width")
    ap.add_argument("--depth", type=int, default=2, help="transformer blocks")
    ap.add_argument("--heads", type=int, default=2, help="attention heads (must divide --dim)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.dim % args.heads:
        ap.error("--heads must divide --dim")
    path = save_random_cpsam(args.out, embed_dim=args.dim, depth=args.depth, num_heads=args.heads,
                             global_attn_indexes=(args.depth - 1,), seed=args.seed)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
