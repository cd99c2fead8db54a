"""``python -m turbostream``: setup, tiny models, model downloads, a headless host, queueing, the demo.

Subcommands import what they need lazily: ``setup`` runs under the system Python before the
virtual environment (and torch) exists.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import host as host_mod
from .errors import UserError

TINY_MODELS_DIR = host_mod.tiny_models_dir()
"""The tiny models of the host this process uses (``COMFYUI_DIR`` / ``COMFYUI_ARCHIVE`` / bundled)."""


class CLIError(UserError):
    """A bad command line."""


def _cmd_setup(args: argparse.Namespace) -> int:
    paths = host_mod.setup(make_models=not args.no_models, browser=args.browser)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_venv_python(args: argparse.Namespace) -> int:
    print(host_mod.venv_python(host_mod.host_dir()))
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from . import tiny_models

    written = tiny_models.make_all(args.out, host_mod.ensure_host(), seed=args.seed)
    for name, path in written.items():
        print(f"{name}\t{path.stat().st_size / 2**20:8.1f} MiB")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from . import hub

    models_dir = Path(args.models_dir) if args.models_dir else host_mod.host_dir() / "models"
    for path in hub.download(args.names, models_dir):
        print(path)
    return 0


def _cmd_list_models(args: argparse.Namespace) -> int:
    from . import hub

    for name, entry in hub.CATALOG.items():
        files = ", ".join(f"{f.folder}/{f.name}" for f in entry.files)
        print(f"{name:16s} {entry.repo_id:36s} -> {files}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import HeadlessHost, demo_model_links

    links = demo_model_links(TINY_MODELS_DIR, host_mod.host_dir() / "models")
    with HeadlessHost(host_mod.ensure_host(), model_links=links, port=args.port) as server:
        print(f"ComfyUI with TurboStream at {server.url} (Ctrl-C stops it)", flush=True)
        try:
            server.wait()
        except KeyboardInterrupt:
            pass
    return 0


def _parse_sets(values: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for item in values or []:
        target, sep, value = item.partition("=")
        node, dot, field = target.partition(".")
        if not sep or not dot or not node or not field:
            raise CLIError(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. --set 3.seed=42")
        out.append((node, field, value))
    return out


def _cmd_queue(args: argparse.Namespace) -> int:
    from . import client

    workflow = client.load_workflow(args.workflow)
    jobs = client.expand_jobs(workflow, _parse_sets(args.set))
    servers = args.server or ["127.0.0.1:8188"]
    results = client.run_jobs(jobs, servers, out_dir=Path(args.out), timeout=args.timeout, progress=not args.quiet)
    for result in results:
        for path in result.images:
            print(path)
    return 0


def _cmd_build_ui(args: argparse.Namespace) -> int:
    import json

    from . import client, workflow

    object_info = _object_info(args.server)
    for api_path in sorted(Path(args.api_dir).glob("*.json")):
        ui = workflow.api_to_ui(client.load_workflow(api_path), object_info)
        dest = Path(args.ui_dir) / api_path.name
        dest.write_text(json.dumps(ui, indent=2) + "\n")
        print(dest)
    return 0


def _object_info(server_address: str | None) -> dict:
    """``/object_info`` of a running host, or of a headless one started for the purpose."""
    import json
    import urllib.request

    def read(url: str) -> dict:
        with urllib.request.urlopen(f"{url}/object_info", timeout=120) as resp:
            return json.loads(resp.read())

    if server_address:
        return read(f"http://{server_address}")
    from .server import HeadlessHost

    with HeadlessHost(host_mod.ensure_host()) as server:
        return read(server.url)


def _cmd_build_docs(args: argparse.Namespace) -> int:
    from . import node_docs

    info = _object_info(args.server)
    ours = sorted(k for k, v in info.items() if host_mod.PACK_FOLDER_NAME in str(v.get("python_module", "")))
    for path in node_docs.build(info, ours, Path(args.docs_dir)):
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(Path(args.out), Path(args.workflows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m turbostream", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("setup", help="fetch the host, create its venv, link the pack, make tiny models")
    p.add_argument("--no-models", action="store_true", help="skip making the tiny models")
    p.add_argument("--browser", action="store_true", help="also install Debian's chromium (browser tests)")
    p.set_defaults(func=_cmd_setup)

    p = sub.add_parser("venv-python", help="print the Python of the selected host's virtual environment")
    p.set_defaults(func=_cmd_venv_python)

    models = sub.add_parser("models", help="tiny test models and real weights").add_subparsers(
        dest="models_command", required=True
    )
    p = models.add_parser("make-tiny", help="write tiny random-weight models with real key layouts")
    p.add_argument("--out", default=str(TINY_MODELS_DIR), help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1234)
    p.set_defaults(func=_cmd_make_tiny)
    p = models.add_parser("download", help="download real weights the bundled workflows name")
    p.add_argument("names", nargs="+", help="catalog names, see 'models list'")
    p.add_argument("--models-dir", help="the host's models folder (default: the host's models/)")
    p.set_defaults(func=_cmd_download)
    p = models.add_parser("list", help="list downloadable models and where they go")
    p.set_defaults(func=_cmd_list_models)

    p = sub.add_parser("serve", help="run a headless host with the pack and the tiny models until Ctrl-C")
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("queue", help="queue an API-format workflow and download its images")
    p.add_argument("workflow", help="API-format workflow JSON (workflows/api/*.json)")
    p.add_argument(
        "--set",
        action="append",
        metavar="NODE.INPUT=VALUE",
        help="override an input; VALUE may be a,b,c (one job each), START..END (ints) or a folder of images",
    )
    p.add_argument(
        "--server",
        action="append",
        metavar="HOST:PORT",
        help="ComfyUI server; repeat to spread jobs over several hosts (default 127.0.0.1:8188)",
    )
    p.add_argument("--out", default="out/queue", help="where images are written (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each job")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_queue)

    wf = sub.add_parser("workflows", help="bundled workflow files").add_subparsers(dest="wf_command", required=True)
    p = wf.add_parser("build-ui", help="rebuild example_workflows/*.json (UI format) from workflows/api/*.json")
    p.add_argument("--server", help="a running host to read /object_info from (default: start one)")
    p.add_argument("--api-dir", default=str(host_mod.REPO_ROOT / "workflows" / "api"))
    p.add_argument("--ui-dir", default=str(host_mod.REPO_ROOT / "example_workflows"))
    p.set_defaults(func=_cmd_build_ui)

    docs = sub.add_parser("docs", help="node docs pages (js/docs/<NodeId>.md)").add_subparsers(
        dest="docs_command", required=True
    )
    p = docs.add_parser("build", help="refresh the generated input/output tables of every node's page")
    p.add_argument("--server", help="a running host to read /object_info from (default: start one)")
    p.add_argument("--docs-dir", default=str(host_mod.REPO_ROOT / "js" / "docs"))
    p.set_defaults(func=_cmd_build_docs)

    p = sub.add_parser("demo", help="start a host, queue every bundled API workflow, write images and timings")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--workflows", default=str(host_mod.REPO_ROOT / "workflows" / "api"))
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
