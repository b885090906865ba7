"""The ``gradmesh`` command: one console script, one subcommand per role.

Errors end in one line on stderr, never a traceback: exit 2 for a bad flag or
configuration, 1 for a failed call or anything unexpected (``--debug`` or
``GRADMESH_DEBUG=1`` shows the traceback).

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when used, so ``gradmesh worker`` never loads
the demo's plotting libraries.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from gradmesh._version import __version__
from gradmesh.server import runtime
from gradmesh.wire.errors import GradmeshError

# The long-running server roles, whose processes get a steady heap (runtime.steady_heap).
SERVERS = ("worker", "shard", "coordinator")
COMMANDS = {
    "worker": ("gradmesh.server.worker", "serve gradients: take a graph, parameters and a batch"),
    "shard": ("gradmesh.server.shard", "hold parameters and optimizer state, apply steps"),
    "coordinator": ("gradmesh.server.coordinator", "run training jobs over workers and shards"),
    "demo": (
        "gradmesh.client.demo",
        "train on handwritten digits (or, --model transformer, a small GPT) on a local cluster",
    ),
    "train": ("gradmesh.client.train", "train a model described in a TOML file"),
    "import": (
        "gradmesh.client.importers.command",
        "convert an .onnx or .pt2 model into a graph file and a safetensors file",
    ),
}
DESCRIPTION = "gradmesh: distributed gradient computation, one command per role."


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("GRADMESH_DEBUG", "").strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
    )


def _known_error(exc: BaseException) -> int | None:
    """The exit code of an error a user can act on from its message (None: unexpected)."""
    if isinstance(exc, runtime.ConfigError) or type(exc).__name__ == "ConfigError":
        return 2
    if isinstance(exc, (GradmeshError, OSError)):
        return 1
    return None


def main(argv: list[str] | None = None) -> int:
    """Run ``gradmesh`` (``argv``: the arguments, default ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001  (the one handler: no traceback reaches a user)
        if debug:
            traceback.print_exc()
        code = _known_error(e)
        if code is not None:
            print(f"error: {e}", file=sys.stderr)
            return code
        logging.getLogger("gradmesh").debug("unexpected error", exc_info=e)
        print(
            f"error: unexpected {type(e).__name__}: {e}\n(a bug in gradmesh; run again "
            f"with --debug or GRADMESH_DEBUG=1 for the traceback"
            f"{', shown above' if debug else ''}; server logs are on stderr)",
            file=sys.stderr,
        )
        return 1


def _main(argv: list[str]) -> int:
    # -h after a command belongs to that command's own parser, built below.
    parser = argparse.ArgumentParser(prog="gradmesh", description=DESCRIPTION, add_help=False)
    parser.add_argument("-h", "--help", action="store_true", help="show this help")
    parser.add_argument("--version", action="version", version=f"gradmesh {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (also GRADMESH_DEBUG=1)",
    )
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
    p = argparse.ArgumentParser(
        prog=f"gradmesh {args.command}", description=COMMANDS[args.command][1]
    )
    module.add_arguments(p)
    rest = argv[argv.index(args.command) + 1 :]
    if args.help and "-h" not in rest and "--help" not in rest:
        rest = ["--help"]  # "gradmesh -h worker" asks for the worker's help too
    sub_args = p.parse_args(rest)
    if args.command in SERVERS:
        runtime.steady_heap()
    return int(module.run(sub_args) or 0)


if __name__ == "__main__":
    sys.exit(main())
