"""The ``gradmesh`` command: one console script, one subcommand per role.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when used, so ``gradmesh worker`` never loads
the demo's plotting libraries.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from gradmesh import __version__
from gradmesh.server import runtime

# The long-running server roles, whose processes get a steady heap (runtime.steady_heap).
SERVERS = ("worker", "shard", "coordinator")
COMMANDS = {
    "worker": ("gradmesh.server.worker", "serve gradients: take a graph, parameters and a batch"),
    "shard": ("gradmesh.server.shard", "hold parameters and optimizer state, apply steps"),
    "coordinator": ("gradmesh.server.coordinator", "run training jobs over workers and shards"),
    "demo": ("gradmesh.client.demo", "train on handwritten digits with a local cluster"),
    "train": ("gradmesh.client.train", "train a model described in a TOML file"),
}


def main(argv: list[str] | None = None) -> int:
    # -h after a command belongs to that command's own parser, built below.
    parser = argparse.ArgumentParser(prog="gradmesh", description=__doc__.splitlines()[0],
                                     add_help=False)
    parser.add_argument("-h", "--help", action="store_true", help="show this help")
    parser.add_argument("--version", action="version", version=f"gradmesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
        p.set_defaults(_module=module)
        # Arguments are added only for the chosen command, to keep imports lazy.
    args, _ = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0 if args.help else 2
    module = importlib.import_module(COMMANDS[args.command][0])
    p = argparse.ArgumentParser(prog=f"gradmesh {args.command}",
                                description=COMMANDS[args.command][1])
    module.add_arguments(p)
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index(args.command) + 1:]
    if args.help and "-h" not in rest and "--help" not in rest:
        rest = ["--help"]           # "gradmesh -h worker" asks for the worker's help too
    sub_args = p.parse_args(rest)
    if args.command in SERVERS:
        runtime.steady_heap()
    try:
        return int(module.run(sub_args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
