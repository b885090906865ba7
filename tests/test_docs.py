"""The documentation runs: every Python and shell block of the Markdown docs is executed
as written, so that the docs cannot drift from the code.

Pages: README.md, CONTRIBUTING.md and docs/*.md. Each fenced block is one test item,
``test_block[<page>:<line>-<language>]``, run in page order:

* ``python`` blocks run in a fresh interpreter (``sys.executable -c``): a block must be
  self-contained (its own imports and data), as a reader copying it would need. A block
  whose code starts with ``>>>`` is run as a doctest (outputs compared, ``...`` allowed).
* ``bash``/``sh`` blocks run with ``bash -e -o pipefail``, with the virtual environment's
  ``bin`` first on ``PATH`` (so ``gradmesh``, ``python`` and ``pip`` are the project's).
* Every block of one page runs in the same fresh directory, in order, like a reader
  following the page: a block may use a file an earlier block of the page wrote.
  (Selecting one block with ``-k`` runs the page's earlier blocks first.)
* ``text`` (and other output or config) blocks are not run. Every block must name its
  language.
* The environment has no ``GRADMESH_*`` variable of the caller's; each block has a
  timeout (60 s unless its marker says otherwise).

An HTML comment right before a block (blank lines between are allowed) changes what is
done with it; several markers are separated by ``;``:

``<!-- doctest: skip (reason) -->``
    not run; reported as skipped with the reason (Docker, Kubernetes, a GPU, TLS
    certificates, long installs and benchmarks).
``<!-- doctest: worker -->``
    the block talks to a worker: one is started for the test session
    (``gradmesh worker --port 0``) and its address is in ``GRADMESH_WORKER``. The page
    shows ``os.environ.get("GRADMESH_WORKER", "127.0.0.1:50051")``, the worker its
    previous block starts.
``<!-- doctest: server -->``
    a shell block that starts a server and runs until stopped (``gradmesh worker --port
    50051``): it is run with ``--port 0`` in place of the port written, must print
    ``listening on``, and is then stopped with SIGTERM and must exit cleanly.
``<!-- doctest: file NAME -->``
    the block (a ``toml`` config, say) is written to ``NAME`` in the page's directory
    for the blocks after it.
``<!-- doctest: timeout SECONDS -->``
    a longer (or shorter) timeout for this block.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted({ROOT / "README.md", *ROOT.glob("CONTRIBUTING.md"), *ROOT.glob("docs/*.md")})
PYTHON = {"python", "py", "python3", "pycon"}
SHELL = {"bash", "sh", "shell"}
DEFAULT_TIMEOUT = 60.0
BIN = Path(sys.executable).parent
MARKER = re.compile(r"^\s*<!--\s*doctest:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)\s*$")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None = None
    worker: bool = False
    server: bool = False
    file: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    markers: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}-{self.lang or 'untagged'}"

    @property
    def runs(self) -> bool:
        return self.skip is None and (self.lang in PYTHON | SHELL or self.file is not None)


def parse_markers(text: str) -> dict:
    """``skip (reason); timeout 90`` -> {"skip": "reason", "timeout": 90.0}; raises
    ValueError on a marker it does not know (a typo must not silently run a block)."""
    out: dict = {}
    parts, depth, current = [], 0, ""
    for ch in text:  # split on ";" outside parentheses
        depth += (ch == "(") - (ch == ")")
        if ch == ";" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    for part in filter(None, (p.strip() for p in parts)):
        m = re.fullmatch(r"skip\s*\((.+)\)", part)
        if m:
            out["skip"] = m.group(1).strip()
        elif part in ("worker", "server"):
            out[part] = True
        elif m := re.fullmatch(r"file\s+(\S+)", part):
            out["file"] = m.group(1)
        elif m := re.fullmatch(r"timeout\s+(\d+(?:\.\d+)?)", part):
            out["timeout"] = float(m.group(1))
        else:
            raise ValueError(
                f"unknown doctest marker {part!r} (known: skip (reason), "
                f"worker, server, file NAME, timeout SECONDS)"
            )
    return out


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of a page, with the markers in the comment right before each."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    pending: tuple[int, str] | None = None  # (line, marker text) awaiting its block
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
            body = []
            j = i + 1
            while j < len(lines) and not (
                lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""
            ):
                body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
                j += 1
            block = Block(page, i + 1, lang, "\n".join(body) + "\n")
            if pending is not None:
                attrs = parse_markers(pending[1])
                block.markers.append(pending[1])
                for key, value in attrs.items():
                    setattr(block, key, value)
                pending = None
            blocks.append(block)
            i = j + 1
            continue
        mm = MARKER.match(lines[i])
        if mm:
            if pending is not None:
                raise ValueError(f"{page.name}:{pending[0]}: doctest marker without a block")
            pending = (i + 1, mm.group(1))
        elif lines[i].strip() and pending is not None:
            raise ValueError(
                f"{page.name}:{pending[0]}: a doctest marker must come right before a fenced block"
            )
        i += 1
    if pending is not None:
        raise ValueError(f"{page.name}:{pending[0]}: doctest marker without a block")
    return blocks


BLOCKS = [b for page in PAGES for b in blocks_of(page)]
RUNNABLE = [b for b in BLOCKS if b.lang in PYTHON | SHELL or b.file is not None]


# -- environment ---------------------------------------------------------------------------


def block_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADMESH_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(BIN.parent)
    env.pop("PYTHONHOME", None)
    env["MPLBACKEND"] = "Agg"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Server:
    """A process started from a command line that prints ``listening on ADDRESS``."""

    def __init__(self, argv: list[str], cwd: Path, timeout: float = 30.0):
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=block_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.output: list[str] = []
        found = threading.Event()
        self.address: str | None = None

        def read(stream):
            for line in stream:
                self.output.append(line)
                m = re.search(r'listening on ([^\s"]+)', line)
                if m and self.address is None:
                    self.address = m.group(1)
                    found.set()

        self._readers = [
            threading.Thread(target=read, args=(s,), daemon=True)
            for s in (self.proc.stdout, self.proc.stderr)
        ]
        for t in self._readers:
            t.start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"{' '.join(argv)} did not print 'listening on' "
                    f"(exit {self.proc.returncode}):\n{self.text()}"
                )

    def text(self) -> str:
        return "".join(self.output)[-4000:]

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM to the process group, then SIGKILL if it outlives ``timeout``."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return -9
        for t in self._readers:
            t.join(5)
        return self.proc.returncode


@pytest.fixture(scope="session")
def doc_worker(tmp_path_factory) -> Iterator[str]:
    """One CPU worker for the blocks marked ``worker``: its address."""
    server = Server(
        [str(BIN / "gradmesh"), "worker", "--port", "0"],
        tmp_path_factory.mktemp("doc-worker"),
        timeout=60.0,
    )
    yield server.address
    server.stop()


class Pages:
    """Per page: the directory its blocks run in and which blocks ran (in order)."""

    def __init__(self, factory):
        self.factory = factory
        self.dirs: dict[Path, Path] = {}
        self.ran: dict[Path, set[int]] = {}

    def directory(self, page: Path) -> Path:
        if page not in self.dirs:
            self.dirs[page] = self.factory.mktemp(re.sub(r"\W", "-", page.stem))
            self.ran[page] = set()
        return self.dirs[page]


@pytest.fixture(scope="session")
def pages(tmp_path_factory) -> Pages:
    return Pages(tmp_path_factory)


# -- running one block ---------------------------------------------------------------------

DOCTEST_RUNNER = """
import doctest, sys
text = sys.stdin.read()
test = doctest.DocTestParser().get_doctest(text, {"__name__": "__main__"}, NAME, NAME, 0)
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
runner.run(test)
sys.exit(1 if runner.failures else 0)
"""


def run_block(block: Block, cwd: Path, worker: str | None) -> None:
    extra = {"GRADMESH_WORKER": worker} if worker else {}
    env = block_env(extra)
    if block.file is not None:
        (cwd / block.file).write_text(block.code)
        return
    if block.server:
        # The port written in the doc may be taken on a shared machine: port 0 instead.
        code = re.sub(r"--port[ =]\d+", "--port 0", block.code)
        server = Server(
            ["bash", "-e", "-o", "pipefail", "-c", f"exec {code.strip()}"],
            cwd,
            timeout=block.timeout,
        )
        rc = server.stop()
        assert rc in (0, -signal.SIGTERM, 128 + signal.SIGTERM), (
            f"{block.name}: the server did not stop cleanly on SIGTERM (exit {rc}):\n"
            f"{server.text()}"
        )
        return
    if block.lang in PYTHON and block.code.lstrip().startswith(">>>"):
        argv = [sys.executable, "-c", DOCTEST_RUNNER.replace("NAME", repr(block.name))]
        stdin = block.code
    elif block.lang in PYTHON:
        argv, stdin = [sys.executable, "-c", block.code], ""
    else:
        argv, stdin = ["bash", "-e", "-o", "pipefail", "-c", block.code], ""
    # A session of its own, so that a timeout also ends what the block started (the
    # servers of a LocalCluster, a background job).
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(stdin, timeout=block.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"{block.name} ran past its {block.timeout:.0f} s timeout "
            f"(raise it with <!-- doctest: timeout N -->):\n{block.code}"
            f"--- stdout\n{out[-6000:]}\n--- stderr\n{err[-6000:]}"
        ) from None
    if proc.returncode != 0:
        raise AssertionError(
            f"{block.name} failed (exit {proc.returncode}):\n--- block\n{block.code}"
            f"--- stdout\n{out[-6000:]}\n--- stderr\n{err[-6000:]}"
        )


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_block(block: Block, pages: Pages, request) -> None:
    if block.skip is not None:
        pytest.skip(f"{block.name}: {block.skip}")
    cwd = pages.directory(block.page)
    ran = pages.ran[block.page]
    worker = request.getfixturevalue("doc_worker") if block.worker else None
    # Blocks of a page run in order: with -k, run the earlier ones first (their files).
    for earlier in RUNNABLE:
        if (
            earlier.page == block.page
            and earlier.line < block.line
            and earlier.runs
            and earlier.line not in ran
        ):
            ran.add(earlier.line)
            run_block(
                earlier, cwd, request.getfixturevalue("doc_worker") if earlier.worker else None
            )
    ran.add(block.line)
    run_block(block, cwd, worker)


# -- the pages themselves ------------------------------------------------------------------


def test_pages_are_found() -> None:
    names = {str(p.relative_to(ROOT)) for p in PAGES}
    assert {"README.md", "CONTRIBUTING.md", "docs/architecture.md"} <= names, names


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_block_names_its_language(page: Path) -> None:
    untagged = [b.line for b in blocks_of(page) if not b.lang]
    assert not untagged, (
        f"{page.name}: blocks at lines {untagged} name no language; use "
        f"python, bash or text (output), so the doc test knows what to run"
    )


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_local_links_resolve(page: Path) -> None:
    """Relative links ([text](path)) point at files that exist."""
    text = page.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.name}: links to missing files: {missing}"


def test_markers_parse() -> None:
    assert parse_markers("skip (needs Docker)") == {"skip": "needs Docker"}
    assert parse_markers("worker; timeout 90") == {"worker": True, "timeout": 90.0}
    assert parse_markers("file job.toml") == {"file": "job.toml"}
    assert parse_markers("skip (a; b); timeout 5") == {"skip": "a; b", "timeout": 5.0}
    with pytest.raises(ValueError, match="unknown doctest marker"):
        parse_markers("skp (typo)")
