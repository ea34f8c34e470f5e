"""The container's HEALTHCHECK: is this bridge doing its job?

/readyz is 200 only when the store works *and* the MQTT broker is connected. For a
container that is too strict: while the broker is away the bridge still accepts every
webhook and keeps it in the outbox, which goes out when the broker is back, and a
restart of the bridge would not bring the broker back. So here:

- /readyz 200                                  -> healthy
- /readyz 503 and every reason is the broker   -> healthy (the reason is printed, and
                                                  `docker inspect` shows it)
- /readyz 503 for the store, or no answer      -> unhealthy

The port is the bridge's own: the same configuration (ESIM_BRIDGE_* variables) is read.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

BROKER_REASON = "MQTT broker"  # bridge/app.py: "not connected to the MQTT broker at ..."


def port() -> int:
    try:
        from bridge import config

        return config.load().http.port
    except Exception:  # a broken configuration: the bridge would not be up either
        return 8080


def main() -> int:
    url = f"http://127.0.0.1:{port()}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            print(f"ready: {response.read().decode(errors='replace')}")
            return 0
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            reasons = [str(reason) for reason in json.loads(body).get("reasons", [])]
        except (ValueError, AttributeError):
            reasons = []
        if reasons and all(BROKER_REASON in reason for reason in reasons):
            print(f"accepting webhooks, queued until the broker is back: {'; '.join(reasons)}")
            return 0
        print(f"not healthy: HTTP {exc.code} {body}")
        return 1
    except OSError as exc:
        print(f"no answer from {url}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
