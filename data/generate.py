"""Generate the tiny-task data splits and the tiny preference benchmark (reward_bench.jsonl).

Usage: python data/generate.py [OUT_DIR]   (default: data/tiny/ next to this file)
Output is byte-identical on every run (fixed seeds).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

try:
    from pipeline.builtin.reward_bench import write_benchmark
    from pipeline.builtin.tasks import write_splits
except ImportError:
    # Run from a checkout without installing: the repo root holds pipeline/.
    sys.path.insert(0, str(HERE.parent))
    for mod in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
        del sys.modules[mod]  # drop an unrelated "pipeline" if one was found
    from pipeline.builtin.reward_bench import write_benchmark
    from pipeline.builtin.tasks import write_splits


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else HERE / "tiny"
    counts = write_splits(out_dir)
    for name, n in counts.items():
        print(f"{out_dir / name}: {n} rows")
    path, n = write_benchmark(out_dir)
    print(f"{path}: {n} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
