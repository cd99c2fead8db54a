"""Diagnosis (not part of ``make bench``): what the front end's own per-prompt work costs the live loop.

Rounds of the ``bench_browser`` browser loop (64², tiny SD1.5, target 30 fps, 2 in flight) alternate
between the front end as it is and the front end with some websocket events withheld from its
listeners (``api.dispatchCustomEvent`` wrapped in the page): ``--withhold execution`` drops the
per-prompt execution events (execution_start / _cached, executing, progress, progress_state, executed:
what a live prompt queued under another websocket client id would never send to this tab);
``--withhold all`` drops ``status`` too (the queue/history re-reads after every queue change). The
live session itself only needs execution_success / _error / _interrupted and the pushed frames.

This is the measurement behind ``js/live_channel.js``: before it, withholding the execution events took
the loop from 2.72 to 3.79 fps (browser CPU 0.76 to 0.59 cores) and withholding ``status`` as well from
2.14 to 3.78 fps (0.73 to 0.34 cores). Live prompts now go under the channel's own client id, so
``--withhold execution`` withholds nothing of theirs, and ``--withhold all`` measures what the
once-a-second status still costs.

    python bench/diag_browser_events.py --withhold execution [--frames-per-prompt 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

EXECUTION_EVENTS = ["executing", "progress", "executed", "progress_state", "execution_start", "execution_cached"]
WITHHOLD_JS = """(types) => {
  const api = window.comfyAPI.api.api;
  const dispatch = api.dispatchCustomEvent.bind(api);
  const withheld = new Set(types);
  api.dispatchCustomEvent = (type, detail) => (withheld.has(type) ? true : dispatch(type, detail));
}"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--withhold", choices=["execution", "all"], default="execution")
    parser.add_argument("--frames-per-prompt", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import bench_browser
    import test_live_browser as tlb
    from playwright.sync_api import sync_playwright

    from turbostream import host as host_mod
    from turbostream import tiny_models
    from turbostream.cli import TINY_MODELS_DIR
    from turbostream.server import HeadlessHost, demo_model_links

    types = EXECUTION_EVENTS + (["status"] if args.withhold == "all" else [])
    tiny_models.make_all(TINY_MODELS_DIR, host_mod.ensure_host())
    host = HeadlessHost(host_mod.ensure_host(), model_links=demo_model_links(TINY_MODELS_DIR)).start()
    opener, withhold = tlb.open_live_workflow, {"on": False}

    def open_live_workflow(browser, host, *a, **k):
        context, page, errors = opener(browser, host, *a, **k)
        if withhold["on"]:
            page.evaluate(WITHHOLD_JS, types)
        return context, page, errors

    tlb.open_live_workflow = open_live_workflow
    results: dict[bool, list[dict]] = {False: [], True: []}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=tlb.CHROMIUM, headless=True, args=tlb.CHROMIUM_ARGS)
            for i in range(args.rounds * 2):
                withhold["on"] = (i % 4) in (1, 2)  # A B B A ...
                r = bench_browser._browser_round(browser, host, tlb, args.frames_per_prompt)
                results[withhold["on"]].append(r)
                print("withheld" if withhold["on"] else "as is", f"{r['fps']:.2f} fps", r["cores"], flush=True)
            browser.close()
    finally:
        host.cleanup()
    for on in (False, True):
        rs = results[on]
        print(
            f"{'withheld ' + args.withhold if on else 'front end as is'}: "
            f"{statistics.median(r['fps'] for r in rs):.2f} fps, browser "
            f"{statistics.median(r['cores']['browser'] for r in rs):.2f} cores, host "
            f"{statistics.median(r['cores']['host'] for r in rs):.2f} cores"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
