"""The command line: serve, check-config, provider-check, send, --version."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import IO

import msgspec

from bridge import __version__, config, examples, logs

EXIT_CONFIG = 2
SWITCH_INTERVAL = 0.001


def _load(path: str | None) -> config.Config | None:
    """The configuration, or None after printing every problem with it."""
    try:
        return config.load(Path(path) if path else None)
    except config.ConfigError as error:
        print(f"esim-bridge: {len(error.problems)} problem(s) with the configuration:",
              file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)
        return None


def check_config(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    print(config.render(settings), end="")
    return 0


def provider_check(args: argparse.Namespace) -> int:
    """One balance/query and one esim/query: whether the credentials work, in one command."""
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    if settings.provider.access_code is None:
        print("esim-bridge: provider.access_code is not set: set it in [provider] (or "
              "ESIM_BRIDGE_PROVIDER_ACCESS_CODE) to your eSIM Access account's access code.",
              file=sys.stderr)
        return EXIT_CONFIG
    from bridge.provider import ProviderClient, ProviderError

    async def ask() -> tuple[str, int]:
        # two tries, not four: a person is waiting for the answer
        async with ProviderClient(settings.provider, attempts=2) as client:
            balance = await client.balance()
            page = await client.profiles(1, 5)
            return f"{balance.usd:.2f}", page.pager.total

    where = settings.provider.base_url
    try:
        balance, esims = asyncio.run(ask())
    except ProviderError as error:
        print(f"esim-bridge: provider-check failed at {error.endpoint} ({where})\n"
              f"  answer:  {error.answer}\n  meaning: {error.meaning}\n  fix:     {error.fix}",
              file=sys.stderr)
        return 1
    signed = "signed" if settings.provider.secret_key else "unsigned"
    print(f"The provider at {where} accepts these credentials ({signed} requests).")
    print(f"balance: {balance} USD")
    print(f"eSIMs: {esims}")
    return 0


def _lock_store(path: Path) -> IO[bytes] | None:
    """An exclusive lock on `<store.path>.lock`, held while this process lives (the kernel
    lets go of it when the process ends, even by kill -9); None when another process
    holds it. Two bridges on one store would publish everything twice, under one MQTT
    client id, and knock each other off the broker."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Windows
        return open(os.devnull, "wb")  # nothing to lock with; held for the process's life
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(f"{path}.lock", "wb")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _listen(host: str, port: int) -> socket.socket:
    """The webhook port, bound before anything else starts (uvicorn would bind it only
    after the app's startup, whose publisher connects to the broker)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    store_path = Path(settings.store.path)
    if settings.store.url is not None:
        # PostgreSQL: no file to lock. One replica for now (one publisher per database is
        # not chosen yet): run one `serve` per database.
        store_lock: IO[bytes] | None = open(os.devnull, "wb")  # noqa: SIM115 - closed below
    else:
        try:
            store_lock = _lock_store(store_path)
        except OSError as exc:
            print(f"esim-bridge: cannot use the store at {store_path}: {exc}",
                  file=sys.stderr)
            return 1
    if store_lock is None:
        print(f"esim-bridge: the store {store_path} is in use by another esim-bridge. Stop "
              "that one, or give this one a store.path of its own.", file=sys.stderr)
        return 1
    host, port = settings.http.host, settings.http.port
    try:
        listener = _listen(host, port)
    except OSError as exc:
        print(f"esim-bridge: cannot listen for webhooks on {host}:{port}: {exc.strerror}. "
              "Is another esim-bridge (or another program) on that port? Stop it, or set "
              "http.port.", file=sys.stderr)
        return 1
    logs.configure_logging(settings.log.level)
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    # Litestar loads its pydantic plugins whenever pydantic can be imported, and it can
    # here only as a dependency of amqtt's command line (typer). Everything here decodes
    # with msgspec; pydantic would be 8.5 MB of this process's memory for nothing.
    sys.modules.setdefault("pydantic", None)  # type: ignore[arg-type]

    import uvicorn

    # The committer thread needs the GIL back right after each fsync; by default a busy
    # event loop keeps it for up to 5 ms, which adds straight to every acknowledgement.
    sys.setswitchinterval(SWITCH_INTERVAL)

    from bridge.app import create_app
    from bridge.broker import BrokerError, EmbeddedBroker, _port_in_use
    from bridge.http import HttpProtocol

    if settings.mqtt.url is None:
        embedded = EmbeddedBroker(settings.mqtt.embedded_listen)
        if _port_in_use(embedded.host, embedded.port):
            try:
                embedded.start()  # raises the explanatory BrokerError
            except BrokerError as exc:
                print(f"esim-bridge: {exc}", file=sys.stderr)
                return 1
    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT once it has shut down gracefully, which makes
        the exit status -15; a stop that was asked for and done cleanly exits 0 here."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    server = Server(
        uvicorn.Config(
            create_app(settings),
            host=settings.http.host,
            port=settings.http.port,
            lifespan="on",
            access_log=False,
            log_config=None,
            log_level="warning",
            http=HttpProtocol,  # httptools, with each answer sent in one write
            loop="uvloop" if sys.platform != "win32" else "asyncio",
            timeout_graceful_shutdown=10,
            timeout_keep_alive=30,
            server_header=False,
            ws="none",  # no websocket routes: not loading the websockets package saves 0.6 MB
            # X-Forwarded-For is the Gate's to judge (http.trusted_proxies); uvicorn's
            # default would believe it from any loopback peer
            proxy_headers=False,
        )
    )
    logging.getLogger("bridge").info(
        "esim-bridge %s: webhooks on http://%s:%d%s", __version__, settings.http.host,
        settings.http.port, settings.http.path,
    )
    try:
        server.run(sockets=[listener])
    finally:
        listener.close()
        store_lock.close()
    return 0 if server.started else 1


def send(args: argparse.Namespace) -> int:
    kind = args.type.upper()
    if kind not in examples.TYPES:
        print(f"esim-bridge: unknown type {args.type!r}; one of {', '.join(examples.TYPES)}",
              file=sys.stderr)
        return EXIT_CONFIG
    body = msgspec.json.encode(examples.example(kind, args.iccid))
    request = urllib.request.Request(
        args.url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    if args.token:
        request.add_header("X-Webhook-Token", args.token)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        answer, status = exc.read().decode(errors="replace"), exc.code
    except urllib.error.URLError as exc:
        print(f"esim-bridge: cannot reach {args.url}: {exc.reason}. Is `esim-bridge serve` "
              "running, and is --url right?", file=sys.stderr)
        return 1
    about = "" if kind in examples.WITHOUT_ICCID else f" for iccid {args.iccid}"
    print(f"sent {kind}{about}: HTTP {status} {answer}")
    return 0 if 200 <= status < 300 else 1


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="esim-bridge",
        description="eSIM Access webhooks in, retained MQTT state and Home Assistant "
        "discovery out.",
    )
    root.add_argument("--version", action="version", version=f"esim-bridge {__version__}")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("serve", help="run the webhook receiver and MQTT publisher")
    run.add_argument("--config", metavar="FILE", help="TOML configuration file")
    run.set_defaults(func=serve)

    check = commands.add_parser("check-config", help="print the effective configuration")
    check.add_argument("--config", metavar="FILE", help="TOML configuration file")
    check.set_defaults(func=check_config)

    provider = commands.add_parser(
        "provider-check", help="check the provider's access code: print the balance and the "
        "number of eSIMs")
    provider.add_argument("--config", metavar="FILE", help="TOML configuration file")
    provider.set_defaults(func=provider_check)

    post = commands.add_parser("send", help="post an example webhook to a running bridge")
    post.add_argument("type", metavar="TYPE", help=", ".join(examples.TYPES))
    post.add_argument("--iccid", default=examples.EXAMPLE_ICCID)
    post.add_argument("--url", default="http://127.0.0.1:8080/webhook",
                      help="the full webhook URL (default: %(default)s)")
    post.add_argument("--token", help="sent as X-Webhook-Token")
    post.set_defaults(func=send)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result: int = args.func(args)
    return result
