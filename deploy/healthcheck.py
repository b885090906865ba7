#!/usr/bin/env python3
"""Exit 0 if the gradmesh server on this host answers the gRPC health check as SERVING.

    gradmesh-healthcheck PORT [--service NAME] [--tls-ca PEM [--tls-cert PEM --tls-key PEM]
                              [--server-name NAME]] [--timeout SECONDS]

Used by the compose healthchecks and, where a server listens with TLS (which the kubelet's
native gRPC probe cannot speak), by Kubernetes exec probes. Health checks need no bearer
token: the servers let them through unauthenticated.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradmesh-healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--service", default="", help="service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--tls-ca", help="CA bundle (PEM) to verify the server with; turns on TLS")
    p.add_argument("--tls-cert", help="client certificate (PEM), for servers that want mTLS")
    p.add_argument("--tls-key", help="client private key (PEM)")
    p.add_argument(
        "--server-name",
        help="name the server certificate is issued to, when it does not cover --host",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    target = f"{args.host}:{args.port}"
    if args.tls_ca:

        def read(path):
            with open(path, "rb") as f:
                return f.read()

        creds = grpc.ssl_channel_credentials(
            read(args.tls_ca),
            read(args.tls_key) if args.tls_key else None,
            read(args.tls_cert) if args.tls_cert else None,
        )
        options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"{target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
