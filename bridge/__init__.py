"""esim-bridge: eSIM Access webhooks in, retained MQTT state out."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("esim-bridge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
