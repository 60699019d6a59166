"""Run the benchmarks and print one table: ours, the peer's figure from the same run, the ratio.

Usage: python bench/run.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import bench_create, bench_kernel_cell, bench_run  # noqa: E402
from bench_files import bench_files  # noqa: E402
from bench_lifecycle import bench_lifecycle, bench_pool  # noqa: E402
from bench_packages import bench_packages  # noqa: E402
from common import bench_manager, report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    parser.add_argument("--no-network", action="store_true",
                        help="skip the rows that install packages from the registry")
    args = parser.parse_args()
    with bench_manager("skb-") as (manager, home):
        rows = bench_create(manager, rounds=2 if args.quick else 7)
        rows += bench_run(manager, rounds=100 if args.quick else 600)
        rows += bench_kernel_cell(rounds=100 if args.quick else 600)
        rows += bench_files(manager, size=256 * 1024**2 if args.quick else 1024**3)
        rows += bench_lifecycle(manager, nbytes=256 * 1024**2 if args.quick else 1024**3,
                                kishu=not args.no_network)
        rows += bench_pool(home / "pool", rounds=3 if args.quick else 11)
        if not args.no_network:
            rows += bench_packages(manager)
    report(rows, "latest")


if __name__ == "__main__":
    main()
