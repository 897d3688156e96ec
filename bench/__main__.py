"""`python -m bench [--only serving,drift] [--quick]`: run Flywheel's benchmarks, print their tables, write
`bench/results/<name>.json` and regenerate `bench/results/latest.md` and the README's benchmark tables
(bench/readme.py) from every result there."""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import time
import traceback
from pathlib import Path

from bench import common

# name → module in bench/ (aliases resolve to the benchmark they name)
BENCHMARKS = {
    "orchestration": "bench.orchestration",
    "serving": "bench.serving",
    "drift": "bench.drift",
    "latency": "bench.latency",
    "memory": "bench.memory",
}
TITLES = {
    "orchestration": "Prefect train flow vs the same steps in a bare script",
    "serving": "Flywheel model server vs mlflow models serve vs in-process predict",
    "drift": "compute_drift vs Evidently on all rows vs bare scipy",
    "latency": "registry alias move → model server answers with the new version",
    "memory": "resident memory of Flywheel's model server vs mlflow models serve",
}
ALIASES = {"train": "orchestration", "flow": "orchestration"}


def parse_only(value: str | None) -> list[str]:
    """`--only a,b` → benchmark names in run order; unknown names are an error."""
    if not value:
        return list(BENCHMARKS)
    wanted = []
    for raw in value.split(","):
        name = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if not name:
            continue
        if name not in BENCHMARKS:
            known = ", ".join([*BENCHMARKS, *ALIASES])
            raise argparse.ArgumentTypeError(f"unknown benchmark {raw!r} (known: {known})")
        if name not in wanted:
            wanted.append(name)
    return [n for n in BENCHMARKS if n in wanted]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--only", type=parse_only, default=list(BENCHMARKS), help="comma-separated: " + ", ".join(BENCHMARKS)
    )
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes in all)")
    p.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR, help="where JSON and latest.md go")
    p.add_argument("--keep-state", action="store_true", help="keep the servers' temporary state after the run")
    return p


def run_one(name: str, quick: bool, root: Path) -> common.BenchResult:
    started = time.perf_counter()
    try:
        result = importlib.import_module(BENCHMARKS[name]).run(quick=quick, root=root / name)
    except Exception as exc:  # a benchmark that fails reports why, never numbers it did not measure
        result = common.BenchResult(name, TITLES.get(name, name), quick)
        result.errors.append(f"{type(exc).__name__}: {exc}".strip()[:2000])
        traceback.print_exc()
    result.seconds = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = common.setup_env()
    machine = common.machine_info()
    failed = 0
    try:
        for name in args.only:
            print(f"--- {name} ({'quick' if args.quick else 'full'}) ...", flush=True)
            result = run_one(name, args.quick, root)
            result.machine = machine
            print(common.render_table(result), flush=True)
            path = common.write_result(result, args.results_dir)
            print(f"wrote {path.name}\n", flush=True)
            failed += bool(result.errors)
    finally:
        if not args.keep_state:
            shutil.rmtree(root, ignore_errors=True)
    order = list(BENCHMARKS)
    results = sorted(
        common.read_results(args.results_dir), key=lambda r: (order.index(r.name) if r.name in order else 99, r.name)
    )
    (args.results_dir / "latest.md").write_text(common.render_markdown(results, machine))
    print(f"wrote latest.md ({len(results)} benchmarks)")
    if args.results_dir.resolve() == common.RESULTS_DIR.resolve():
        from bench import readme

        readme.update()  # the README's tables are generated from the same results, never typed
        print("regenerated the README's benchmark tables")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
