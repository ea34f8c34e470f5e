"""esim-bridge: eSIM Access webhooks in, retained MQTT state out."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # Looked up on first use: importlib.metadata is a few MB the publisher process
    # (which imports this package) never needs.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("esim-bridge")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0.0.0+unknown"
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")
