"""Server-side limits on streaming calls and on what one peer may hold.

Idle timeout: a client stream that sends no frame for ``stream_idle_timeout`` seconds
while the server waits for one ends with DEADLINE_EXCEEDED and frees its slot, whatever
deadline (or none) the client set. The request iterator is read by a helper thread into a
queue that the handler reads with a timeout; time the handler spends computing does not
count (the server is not waiting for the client then).

Fair slots: no peer identity holds more than ``per_peer`` of the concurrent-request slots
(default ``max(1, slots // 2)``), so one peer cannot take every slot. A peer's identity is
its address without the port ("ipv4:10.0.0.7"): the bearer token is one for the whole
server, so it does not tell clients apart.
"""

from __future__ import annotations

import queue
import threading

import grpc

from gradmesh.server.runtime.errors import ServiceError

DEFAULT_STREAM_IDLE_TIMEOUT = 30.0
_END = object()


class IdleTimeoutIterator:
    """``requests`` with at most ``timeout`` seconds of waiting for each next frame."""

    def __init__(self, requests, timeout: float, context=None):
        self._timeout = timeout
        self._frames: queue.Queue = queue.Queue(maxsize=2)
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._pump, args=(requests,), daemon=True, name="gradmesh-stream-reader"
        )
        self._thread.start()
        if context is not None:
            context.add_callback(self._done.set)

    def _pump(self, requests) -> None:
        try:
            for frame in requests:
                while not self._done.is_set():
                    try:
                        self._frames.put((frame, None), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self._done.is_set():
                    return
            self._put((_END, None))
        except BaseException as exc:  # noqa: BLE001  (handed to the reading thread)
            self._put((_END, exc))

    def _put(self, item) -> None:
        while not self._done.is_set():
            try:
                self._frames.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        if self._done.is_set():
            raise StopIteration
        try:
            frame, exc = self._frames.get(timeout=self._timeout)
        except queue.Empty:
            self._done.set()
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no frame from the client for {self._timeout:g} s (stream_idle_timeout); "
                f"the stream is closed, send frames without long pauses or raise the "
                f"server's --stream-idle-timeout",
            ) from None
        if frame is _END:
            self._done.set()
            if exc is not None:
                raise exc
            raise StopIteration
        return frame


def idle_timeout(requests, timeout: float | None, context=None):
    """``requests`` wrapped with the idle timeout (unchanged when ``timeout`` is off)."""
    if not timeout or timeout <= 0:
        return requests
    return IdleTimeoutIterator(requests, timeout, context)


def peer_identity(peer: str | None) -> str:
    """A gRPC peer string without its port: "ipv4:127.0.0.1:5123" -> "ipv4:127.0.0.1"."""
    peer = peer or ""
    if peer.startswith("ipv4:"):
        return peer.rsplit(":", 1)[0]
    if peer.startswith("ipv6:"):
        host = peer[5:]
        if host.startswith("[") and "]" in host:
            return "ipv6:" + host[: host.index("]") + 1]
        return peer
    return peer  # unix sockets and others: as given


def per_peer_limit(slots: int, configured: int | None) -> int:
    """Slots one peer may hold: ``configured`` if set, else ``max(1, slots // 2)``."""
    if configured:
        return max(1, min(int(configured), slots))
    return max(1, slots // 2)


class PeerSlots:
    """Counts of in-flight calls per peer identity (callers hold the interceptor's lock)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._held: dict[str, int] = {}

    def try_take(self, identity: str) -> bool:
        n = self._held.get(identity, 0)
        if n >= self.limit:
            return False
        self._held[identity] = n + 1
        return True

    def release(self, identity: str) -> None:
        n = self._held.get(identity, 0) - 1
        if n > 0:
            self._held[identity] = n
        else:
            self._held.pop(identity, None)

    def held(self, identity: str) -> int:
        return self._held.get(identity, 0)
