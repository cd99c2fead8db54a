"""``make bench``: run every ``bench/bench_*.py``, print one markdown table, write the results.

Each module's rows go to ``results/<module>.json`` (with the machine and date of that run), and
``results/latest.json`` merges every module file, so ``-k`` re-runs one benchmark without losing
the others' rows.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO_ROOT))

from harness import machine_line  # noqa: E402

from turbostream import host as host_mod  # noqa: E402
from turbostream import tiny_models  # noqa: E402
from turbostream.cli import TINY_MODELS_DIR  # noqa: E402
from turbostream.server import HeadlessHost, demo_model_links  # noqa: E402


@dataclass
class Context:
    n: int
    out_dir: Path
    _host: HeadlessHost | None = None

    @property
    def host(self) -> HeadlessHost:
        if self._host is None:
            tiny_models.make_all(TINY_MODELS_DIR, host_mod.ensure_host())
            self._host = HeadlessHost(host_mod.ensure_host(), model_links=demo_model_links(TINY_MODELS_DIR)).start()
        return self._host


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-k", help="only benchmarks whose module name contains this")
    parser.add_argument("-n", type=int, default=7, help="timed rounds per configuration (median)")
    args = parser.parse_args()
    modules = sorted(p.stem for p in BENCH_DIR.glob("bench_*.py") if not args.k or args.k in p.stem)
    ctx = Context(n=args.n, out_dir=REPO_ROOT / "out" / "bench")
    rows, started = [], time.time()
    results = BENCH_DIR / "results"
    results.mkdir(exist_ok=True)
    machine = machine_line()
    try:
        for name in modules:
            t0 = time.time()
            module_rows = [c.as_dict() for c in importlib.import_module(name).run(ctx)]
            rows += module_rows
            _write_json(results / f"{name}.json", machine, time.time() - t0, module_rows)
    finally:
        if ctx._host is not None:
            ctx._host.cleanup()
    lines = [
        f"Machine: {machine}",
        "",
        "| benchmark | A | B | median A (s) | median B (s) | A/B | n | note |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r['a']} | {r['b']} | {r['median_a_s']:.4f} | {r['median_b_s']:.4f} | "
            f"{r['ratio_a_over_b']:.2f} | {r['n']} | {r['note']} |"
        )
    print("\n".join(lines))
    merged = []
    for path in sorted(results.glob("bench_*.json")):
        data = json.loads(path.read_text())
        merged += [
            {**r, "module": path.stem, "machine": data["machine"], "date": data["date"]} for r in data["results"]
        ]
    _write_json(results / "latest.json", machine, time.time() - started, merged)
    return 0


def _write_json(path: Path, machine: str, seconds: float, rows: list[dict]) -> None:
    payload = {"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(seconds, 1)}
    path.write_text(json.dumps({**payload, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
