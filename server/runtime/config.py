"""A server's configuration: :class:`ServerConfig`, its flags and ``GRADMESH_*`` variables,
and the start-up check that refuses unsafe or unworkable settings."""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass
from typing import Any

MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB
DEFAULT_MAX_CONCURRENT_REQUESTS = 8


@dataclass
class ServerConfig:
    """How a gradmesh server listens, authenticates and limits itself."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port (see RunningServer.port)
    max_workers: int | None = None  # gRPC thread pool; None: concurrency + 4
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    token: str | None = None  # bearer token clients must send
    tls_cert: str | None = None  # PEM paths; tls_ca turns on client auth (mTLS)
    tls_key: str | None = None
    tls_ca: str | None = None
    insecure: bool = False  # allow plaintext on a non-loopback address
    metrics_port: int | None = None  # Prometheus HTTP port; 0/None: off
    metrics_host: str = "127.0.0.1"  # where the metrics port binds
    log_format: str = "json"  # "json" or "text"
    log_level: str = "INFO"
    grace: float = 10.0  # seconds in-flight calls get on shutdown
    # Idle client streams end after this many seconds without a frame (0: never), and one
    # peer holds at most this many request slots (None: max(1, slots // 2)); streams.py.
    stream_idle_timeout: float = 30.0
    max_requests_per_peer: int | None = None

    def pool_size(self) -> int:
        # Room above the request limit so health checks and rejections are never queued.
        return self.max_workers or self.max_concurrent_requests + 4


class ConfigError(ValueError):
    """A server configuration that must not start (e.g. plaintext on a public address)."""


def _env(name: str, default: Any) -> Any:
    return os.environ.get("GRADMESH_" + name, default)


def env_flag(name: str) -> bool:
    """Whether ``$GRADMESH_<name>`` says yes (1, true, yes, on): a store_true flag's default."""
    return str(_env(name, "")).strip().lower() in ("1", "true", "yes", "on")


def env_default(flag: str, default: Any) -> Any:
    """The default of ``--some-flag``: ``$GRADMESH_SOME_FLAG`` if set, else ``default``.

    argparse converts a string default with the argument's ``type``, so an environment
    value is parsed like the flag would be. Services use it for their own flags too.
    """
    return _env(flag.lstrip("-").replace("-", "_").upper(), default)


def port_number(text: str) -> int:
    """An argparse ``type``: a TCP port, 0..65535."""
    try:
        port = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0..65535)")
    return port


def add_server_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Add the common server flags; each can also be set by a ``GRADMESH_*`` variable."""
    g = parser.add_argument_group(
        "server (each flag also reads GRADMESH_<FLAG>, e.g. GRADMESH_PORT)"
    )
    d = env_default
    g.add_argument(
        "--host",
        default=d("host", "127.0.0.1"),
        help="address to bind (default 127.0.0.1; others need TLS or --insecure)",
    )
    g.add_argument(
        "--port",
        type=port_number,
        default=d("port", default_port),
        help=(
            f"port to bind (default {default_port}); 0: any free port, printed on stdout "
            f'in the start-up line "... listening on HOST:PORT" (a JSON object with an '
            f"address field under --log-format json)"
        ),
    )
    g.add_argument(
        "--max-workers",
        type=int,
        default=d("max-workers", None),
        help="gRPC thread pool size (default: max-concurrent-requests + 4)",
    )
    g.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=d("max-concurrent-requests", DEFAULT_MAX_CONCURRENT_REQUESTS),
        help="requests served at once; more get RESOURCE_EXHAUSTED",
    )
    g.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=d("stream-idle-timeout", 30.0),
        help="seconds a client stream may send nothing before it is ended with "
        "DEADLINE_EXCEEDED, freeing its slot (default 30; 0: never)",
    )
    g.add_argument(
        "--max-requests-per-peer",
        type=int,
        default=d("max-requests-per-peer", None),
        help="request slots one peer address may hold at once (default: half "
        "of --max-concurrent-requests, at least 1)",
    )
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=d("max-message-bytes", DEFAULT_MAX_MESSAGE_BYTES),
        help="largest unary message, in bytes",
    )
    g.add_argument(
        "--token",
        default=d("token", None),
        help="bearer token clients must send (prefer GRADMESH_TOKEN or --token-file)",
    )
    g.add_argument(
        "--token-file", default=d("token-file", None), help="file holding the bearer token"
    )
    g.add_argument("--tls-cert", default=d("tls-cert", None), help="server certificate (PEM)")
    g.add_argument("--tls-key", default=d("tls-key", None), help="server private key (PEM)")
    g.add_argument(
        "--tls-ca",
        default=d("tls-ca", None),
        help="CA bundle (PEM); clients must present a certificate it signed (mTLS)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        default=env_flag("INSECURE"),
        help="allow plaintext on a non-loopback address",
    )
    g.add_argument(
        "--metrics-port",
        type=port_number,
        default=d("metrics-port", None),
        help="serve Prometheus metrics on this port (default off): HTTPS with "
        "--tls-cert, and the bearer token required when one is set",
    )
    g.add_argument(
        "--metrics-host",
        default=d("metrics-host", "127.0.0.1"),
        help="address the metrics port binds (default 127.0.0.1; others need "
        "--tls-cert or --insecure, like --host)",
    )
    g.add_argument("--log-format", choices=("json", "text"), default=d("log-format", "json"))
    g.add_argument("--log-level", default=d("log-level", "INFO"))
    g.add_argument(
        "--grace",
        type=float,
        default=d("grace", 10.0),
        help="seconds in-flight calls get to finish on SIGTERM (default 10)",
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` described by flags added with :func:`add_server_arguments`."""
    token = args.token
    if getattr(args, "token_file", None):
        token = read_token_file(args.token_file, "--token-file")
    return ServerConfig(
        host=args.host,
        port=args.port,
        max_workers=args.max_workers,
        max_concurrent_requests=args.max_concurrent_requests,
        max_message_bytes=args.max_message_bytes,
        token=token or None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        insecure=args.insecure,
        metrics_port=args.metrics_port,
        metrics_host=getattr(args, "metrics_host", "127.0.0.1"),
        log_format=args.log_format,
        log_level=args.log_level,
        grace=args.grace,
        stream_idle_timeout=getattr(args, "stream_idle_timeout", 30.0),
        max_requests_per_peer=getattr(args, "max_requests_per_peer", None),
    )


def read_token_file(path: str, flag: str) -> str:
    """The bearer token in ``path`` (``flag``'s value); ConfigError naming both when it
    cannot be read or holds no token."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{flag} {path}: cannot read it: {getattr(e, 'strerror', None) or e}"
        ) from None
    if not token:
        raise ConfigError(
            f"{flag} {path}: the file is empty; refusing to start without the token it should hold"
        )
    return token


def _check_readable(flag: str, path: str | None) -> None:
    if not path:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it: {e.strerror or e}") from None


def check_address(flag: str, address: str) -> str:
    """``address`` if it is ``host:port`` (``[v6]:port``) with a port 1..65535, else
    ConfigError naming ``flag``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{flag}: {address!r} is not host:port (port 1..65535)")
    return address


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_config(config: ServerConfig) -> None:
    """Refuse configurations that are unsafe or cannot work, with a message that says why."""
    if config.max_concurrent_requests < 1:
        raise ConfigError("max_concurrent_requests must be at least 1")
    if config.max_workers is not None and config.max_workers < 1:
        raise ConfigError("max_workers must be at least 1")
    for flag, port in (("--port", config.port), ("--metrics-port", config.metrics_port)):
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"{flag} {port} is not a port (0..65535)")
    if config.max_message_bytes < 1024:
        raise ConfigError("max_message_bytes must be at least 1024")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    if config.tls_ca and not config.tls_cert:
        raise ConfigError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    for flag, path in (
        ("--tls-cert", config.tls_cert),
        ("--tls-key", config.tls_key),
        ("--tls-ca", config.tls_ca),
    ):
        _check_readable(flag, path)
    if (
        config.metrics_port
        and not config.tls_cert
        and not config.insecure
        and not is_loopback(config.metrics_host)
    ):
        raise ConfigError(
            f"refusing to serve metrics in plaintext on non-loopback address "
            f"{config.metrics_host!r} (--metrics-host): give --tls-cert/--tls-key, use "
            f"--metrics-host 127.0.0.1, or pass --insecure if the network is trusted"
        )
    if not config.tls_cert and not config.insecure and not is_loopback(config.host):
        raise ConfigError(
            f"refusing to serve plaintext on non-loopback address {config.host!r}: give "
            f"--tls-cert/--tls-key (and --tls-ca for mTLS), bind 127.0.0.1, or pass "
            f"--insecure if the network is trusted"
        )
    if config.log_format not in ("json", "text"):
        raise ConfigError(f"log_format must be 'json' or 'text', got {config.log_format!r}")
