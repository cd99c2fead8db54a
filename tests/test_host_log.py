"""What the whole suite left in the host's log: no deprecation warning caused by the pack."""

from __future__ import annotations

import re

import pytest

from turbostream.host import PACK_FOLDER_NAME

DEPRECATION = re.compile(r"deprecat|has moved|will be removed|FutureWarning", re.IGNORECASE)
WARNING_SOURCE = re.compile(r"^(?P<path>/\S+\.py):\d+: \w*Warning")
"""A Python ``warnings`` line names the file that triggered it; a logged warning names nothing."""


def pack_deprecations(log: str) -> list[str]:
    """Deprecation lines in ``log`` that the pack can have caused: Python warnings raised from the pack's
    files, and every logged deprecation printed after the pack loaded (those name no caller)."""
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if "TurboStream loaded" in line), 0)
    found = []
    for line in lines[start:]:
        if not DEPRECATION.search(line):
            continue
        source = WARNING_SOURCE.match(line.strip())
        if source and PACK_FOLDER_NAME not in source["path"] and "/turbostream/" not in source["path"]:
            continue  # raised from the host's or a library's own code
        found.append(line.strip())
    return found


def test_deprecation_filter_sees_what_it_must():
    """Sensitivity: the host's moved-name warning and a warning from the pack's files are caught; a library's is not."""
    log = "\n".join(
        [
            "TurboStream loaded: 13 nodes",
            "WARNING: string_to_seed has moved from comfy.model_patcher to comfy.utils",
            f"/x/custom_nodes/{PACK_FOLDER_NAME}/nodes/a.py:3: DeprecationWarning: old",
            "/venv/lib/site-packages/lib.py:9: FutureWarning: something",
        ]
    )
    assert pack_deprecations(log) == log.splitlines()[1:3]


@pytest.mark.after_all
def test_no_deprecation_warning_from_the_pack_in_the_host_log(host):
    found = pack_deprecations(host.log_text())
    assert not found, f"{len(found)} deprecation line(s) in the host log, e.g.:\n" + "\n".join(sorted(set(found))[:10])
