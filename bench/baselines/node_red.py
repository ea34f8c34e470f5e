"""A Node-RED flow doing the bridge's job the way a Node-RED user would.

http in → json → mqtt out (QoS 1, retained), and a 200 from http response,
without waiting for the broker: the tool many users would otherwise reach for,
and the issue's reference for "at least 2.5 times faster".
Node-RED 4 is installed from npm into /work/main/.cache/node-red, a cache
shared with the tests; the editor and admin API are off so that only the flow
runs, and nothing talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "node-red"
RED_JS = CACHE / "node_modules" / "node-red" / "red.js"
TOPIC_BASE = "bench/node-red"
# Node ids look like Node-RED's own: an id equal to a property value ("json")
# makes Node-RED think a node depends on itself.
TAB = "b3c0de000001"
BROKER = "b3c0de000002"
HTTP_IN = "b3c0de000003"
JSON = "b3c0de000004"
MQTT_OUT = "b3c0de000005"
SET_OK = "b3c0de000006"
RESPOND = "b3c0de000007"
READY = "b3c0de000008"

SETTINGS = """module.exports = {
    uiHost: "127.0.0.1",
    uiPort: %(port)d,
    flowFile: "flows.json",
    userDir: %(userdir)s,
    httpAdminRoot: false,
    credentialSecret: false,
    diagnostics: { enabled: false, ui: false },
    runtimeState: { enabled: false, ui: false },
    telemetry: { enabled: false, updateNotification: false },
    externalModules: { autoInstall: false, palette: { allowInstall: false } },
    logging: { console: { level: "warn", metrics: false, audit: false } },
};
"""


def unavailable() -> str | None:
    """Why Node-RED cannot run here, or None when it can (after installing it)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "node/npm not on PATH"
    if RED_JS.exists():
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"installing node-red@4 into {CACHE} (once; the cache is reused) ...", flush=True)
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(CACHE), "node-red@4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0 or not RED_JS.exists():
        return f"npm install node-red@4 failed: {done.stderr.strip()[-300:]}"
    return None


def flow(mqtt_port: int) -> list[dict[str, object]]:
    return [
        {"id": TAB, "type": "tab", "label": "bench"},
        {
            "id": BROKER,
            "type": "mqtt-broker",
            "name": "mosquitto",
            "broker": "127.0.0.1",
            "port": str(mqtt_port),
            "clientid": "node-red-bench",
            "autoConnect": True,
            "usetls": False,
            "protocolVersion": "4",
            "keepalive": "60",
            "cleansession": True,
            "birthTopic": "",
            "closeTopic": "",
            "willTopic": "",
        },
        {
            "id": HTTP_IN,
            "type": "http in",
            "z": TAB,
            "url": "/webhook",
            "method": "post",
            "upload": False,
            "wires": [[JSON]],
        },
        {
            "id": JSON,
            "type": "json",
            "z": TAB,
            "action": "obj",
            "property": "payload",
            "pretty": False,
            "wires": [[MQTT_OUT, SET_OK]],
        },
        {
            "id": MQTT_OUT,
            "type": "mqtt out",
            "z": TAB,
            "topic": f"{TOPIC_BASE}/event",
            "qos": "1",
            "retain": "true",
            "broker": BROKER,
            "wires": [],
        },
        {
            "id": SET_OK,
            "type": "change",
            "z": TAB,
            "rules": [
                {"t": "set", "p": "payload", "pt": "msg", "to": '{"ok":true}', "tot": "json"}
            ],
            "wires": [[RESPOND]],
        },
        {"id": RESPOND, "type": "http response", "z": TAB, "statusCode": "200", "wires": []},
        {
            "id": READY,
            "type": "http in",
            "z": TAB,
            "url": "/readyz",
            "method": "get",
            "wires": [[RESPOND]],
        },
    ]


def command(workdir: Path, port: int, mqtt_port: int) -> list[str]:
    """Writes the flow and settings into `workdir`; returns the argv to run them."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "flows.json").write_text(json.dumps(flow(mqtt_port), indent=1))
    settings = workdir / "settings.js"
    settings.write_text(SETTINGS % {"port": port, "userdir": json.dumps(str(workdir))})
    node = shutil.which("node") or "node"
    return [node, str(RED_JS), "--settings", str(settings), "--userDir", str(workdir)]
