"""TLS: the credentials of a server's own port, and how it dials the services it depends
on (the coordinator's connections to workers and shards, a worker's registration)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import grpc

from gradmesh.server.runtime.config import (
    ConfigError,
    ServerConfig,
    env_default,
    env_flag,
    read_token_file,
)

# One TLS description for every gradmesh connection (client/channel.py builds them).
from gradmesh.wire.channel import TLS


def _read(path: str | None) -> bytes:
    if path is None:  # ServerConfig's start-up check gives TLS both files or neither
        raise ValueError("a TLS server needs --tls-cert and --tls-key")
    with open(path, "rb") as f:
        return f.read()


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    """The credentials of ``config``'s ``--tls-*`` files; with ``tls_ca``, clients must
    present a certificate it signed (mTLS)."""
    return grpc.ssl_server_credentials(
        [(_read(config.tls_key), _read(config.tls_cert))],
        root_certificates=_read(config.tls_ca) if config.tls_ca else None,
        require_client_auth=bool(config.tls_ca),
    )


@dataclass
class PeerConfig:
    """How a service dials the services it depends on: ``tls`` (None: plaintext) and the
    bearer ``token`` it sends them."""

    tls: TLS | None = None
    token: str | None = None


def add_peer_arguments(parser: argparse.ArgumentParser, whom: str) -> None:
    """Add the ``--peer-*`` flags: TLS and token of the connections to ``whom``.

    Defaults follow the server's own flags, for a deployment with one CA and one token:
    with ``--tls-ca`` (mTLS) the peers are dialled with TLS too, verified with that CA and
    presenting this server's ``--tls-cert``/``--tls-key``; the token sent is ``--token``.
    """
    g = parser.add_argument_group(
        f"connections to {whom} (each flag also reads GRADMESH_<FLAG>; defaults follow "
        f"this server's own --tls-*/--token flags)"
    )
    d = env_default
    g.add_argument(
        "--peer-tls-ca",
        default=d("peer-tls-ca", None),
        help=f"CA bundle (PEM) to verify {whom} with; turns on TLS to them "
        f"(default: --tls-ca if given, else plaintext)",
    )
    g.add_argument(
        "--peer-tls-cert",
        default=d("peer-tls-cert", None),
        help=f"client certificate (PEM) shown to {whom} for mTLS (default: "
        f"--tls-cert when TLS to them is on)",
    )
    g.add_argument(
        "--peer-tls-key",
        default=d("peer-tls-key", None),
        help="private key (PEM) of --peer-tls-cert (default: --tls-key)",
    )
    g.add_argument(
        "--peer-server-name",
        default=d("peer-server-name", None),
        help=f"name to check in the certificates of {whom} instead of the host "
        f"dialled (e.g. when it is an IP address their certificates lack)",
    )
    g.add_argument(
        "--peer-insecure",
        action="store_true",
        default=env_flag("PEER_INSECURE"),
        help=f"dial {whom} in plaintext even though --tls-ca is given",
    )
    g.add_argument(
        "--peer-token",
        default=d("peer-token", None),
        help=f"bearer token sent to {whom} (default: --token)",
    )
    g.add_argument(
        "--peer-token-file", default=d("peer-token-file", None), help="file holding --peer-token"
    )


def _peer_token(args: argparse.Namespace, config: ServerConfig) -> str | None:
    token = args.peer_token
    if args.peer_token_file:
        token = read_token_file(args.peer_token_file, "--peer-token-file")
    return token or config.token


def peer_config_from_args(args: argparse.Namespace, config: ServerConfig) -> PeerConfig:
    """The :class:`PeerConfig` of flags added with :func:`add_peer_arguments`; raises
    ConfigError for contradictory flags or certificate files that cannot be read."""
    token = _peer_token(args, config)
    explicit = [
        f
        for f, v in (
            ("--peer-tls-ca", args.peer_tls_ca),
            ("--peer-tls-cert", args.peer_tls_cert),
            ("--peer-tls-key", args.peer_tls_key),
            ("--peer-server-name", args.peer_server_name),
        )
        if v
    ]
    if args.peer_insecure:
        if explicit:
            raise ConfigError(f"--peer-insecure contradicts {', '.join(explicit)}")
        return PeerConfig(None, token)
    if bool(args.peer_tls_cert) != bool(args.peer_tls_key):
        raise ConfigError(
            "a client certificate for peers needs both --peer-tls-cert and --peer-tls-key"
        )
    if not (args.peer_tls_ca or args.peer_tls_cert or config.tls_ca):
        if args.peer_server_name:
            raise ConfigError("--peer-server-name needs TLS to peers (--peer-tls-ca, or --tls-ca)")
        return PeerConfig(None, token)
    cert, key = (
        (args.peer_tls_cert, args.peer_tls_key)
        if args.peer_tls_cert
        else (config.tls_cert, config.tls_key)
    )
    if bool(cert) != bool(key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    tls = TLS(
        ca=args.peer_tls_ca or config.tls_ca, cert=cert, key=key, server_name=args.peer_server_name
    )
    try:
        tls.credentials()  # fail at start-up, not at the first call
    except OSError as e:
        raise ConfigError(f"cannot read a TLS file for connections to peers: {e}") from None
    return PeerConfig(tls, token)
