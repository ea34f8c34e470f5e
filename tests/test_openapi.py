"""The OpenAPI document at /schema tells the truth about the real bridge.

Schemathesis (`st run --checks all`) reads `/schema/openapi.json` of a running
`esim-bridge serve` with a real Mosquitto, and sends what the document allows and what
it forbids: every answer and its body must be one the document declares, what it
forbids must be refused, and a method it does not name must get 405 with an `Allow`
header (RFC 9110). Bounded and deterministic, so that it takes seconds and fails the
same way every time. (The CLI, not schemathesis's pytest plugin: the plugin's lazy
loader, which a fixture-started bridge needs, relies on a pytest internal that pytest 9
removed.)
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import Mosquitto
from tests.processes import BridgeProcess, request

EXAMPLES = 100  # per operation and phase: the whole run takes a few seconds


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto) -> Iterator[BridgeProcess]:
    sections: dict[str, dict[str, object]] = {"homeassistant": {"discovery": False}}
    process = BridgeProcess(tmp_path_factory.mktemp("openapi") / "bridge", broker.url, sections)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def schemathesis(bridge: BridgeProcess, workdir: Path) -> subprocess.CompletedProcess[str]:
    """`st run` with every check against the bridge's own document; in `workdir`, so
    that no schemathesis.toml of anyone's applies."""
    command = [
        sys.executable, "-m", "schemathesis.cli", "run",
        f"{bridge.base_url}/schema/openapi.json",
        "--checks", "all",
        "--max-examples", str(EXAMPLES),
        "--generation-deterministic",
        "--phases", "examples,coverage,fuzzing",
        "--request-timeout", "10",
        "--no-color",
    ]
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=55)


def test_the_bridge_answers_as_its_openapi_document_says(
    bridge: BridgeProcess, tmp_path: Path
) -> None:
    run = schemathesis(bridge, tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/webhook", "POST"), ("PUT", "/webhook", "POST"), ("TRACE", "/healthz", "GET"),
     ("POST", "/metrics", "GET")],
)
def test_a_method_not_allowed_says_which_are(
    bridge: BridgeProcess, method: str, path: str, allow: str
) -> None:
    answer = request(bridge.base_url + path, b"{}" if method != "GET" else None, method=method)
    assert answer.status == 405, answer
    headers = {name.lower(): value for name, value in answer.headers.items()}
    assert allow in headers.get("allow", "").replace(" ", "").split(","), answer.headers
    assert answer.json() == {"ok": False, "error": "Method Not Allowed"}
