"""uvicorn's httptools protocol, with each response written in one system call, the gateway's
client limits applied, and each request told what happens to its connection.

An ASGI response is two messages, ``http.response.start`` and ``http.response.body``, and
uvicorn writes each to the socket as it comes: two ``send`` system calls per response, the
largest single share of a busy event loop's time. Writes are held instead, and go out
together:

- while other requests are being served, at the end of the loop turn, so that the responses
  of a turn leave back to back and the next turn finds their clients' next requests together;
- when a request is the only one in progress, as soon as its response is complete, in the
  same step: one system call instead of two, and no loop turn of latency.

A response that streams is never held past the end of the loop turn it was written in.

Holding pays only when the process is busy: it turns a stream of requests into batches, which
a saturated loop serves with fewer wakeups, and which a loop with time to spare would only
make wait. So responses are held to the end of the turn only while the process has kept a
core busy (:class:`LoadWatch`: its CPU time over the last few tens of milliseconds);
otherwise each goes as soon as it is complete. benchmarks/README.md has what each choice
measured.

It tells a request that its client has gone while the request waits on the model server,
which an ASGI app could learn only from a task of its own per request reading ``receive``:
the connection's loss cancels the task the request left in its signals
(:class:`~model_gateway.serving.signals.RequestSignals`).

And it holds its clients to the gateway's limits (``limits.py``), which the app offers in its
lifespan state: it shows a sweep whether it waits for a request's head, notes when the
transport pauses its writes, and counts the bytes of a head that is still incomplete after a
read.

This module is built on uvicorn's internals (``HttpToolsProtocol``, its cycle and flow
control), so pyproject.toml bounds uvicorn to the releases CI tests it against; with any
other, or with ``server.edge: stock``, the gateway runs on uvicorn's own protocol.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
import time
from collections.abc import Callable, Iterable, Sized
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..errors import ERROR_CODE_HEADER, GatewayError, HeaderTooLargeError, RequestTimeoutError
from .limits import HEADER_TOO_LARGE, ClientLimits
from .signals import EXTENSION, LIMITS_STATE, RequestSignals

#: how often a :class:`LoadWatch` looks at the process's CPU time
LOAD_INTERVAL = 0.05
#: a process that spent more than this share of an interval on the CPU holds its responses
HOLD_ABOVE = 0.75
#: one that holds them goes back to writing each at once below this share
RELEASE_BELOW = 0.5


class LoadWatch:
    """Whether the process is busy enough for held writes to pay: busy once it spent over
    HOLD_ABOVE of an interval on the CPU, until it spends under RELEASE_BELOW (the gap keeps
    it from flapping at the border).

    It looks when asked, at most once per LOAD_INTERVAL, rather than on a timer of its own:
    a process with nothing to serve is not woken to measure that it is idle. The first look
    after a quiet spell spans the whole of it, and finds the process not busy, which it was.
    """

    __slots__ = ("_busy", "_cpu", "_cpu_clock", "_wall", "_wall_clock")

    def __init__(
        self,
        wall_clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        self._busy = False
        self._wall_clock, self._cpu_clock = wall_clock, cpu_clock
        self._wall, self._cpu = wall_clock(), cpu_clock()

    def busy(self) -> bool:
        wall = self._wall_clock()
        if wall - self._wall >= LOAD_INTERVAL:
            cpu = self._cpu_clock()
            share = (cpu - self._cpu) / (wall - self._wall)
            self._wall, self._cpu = wall, cpu
            self._busy = share > (RELEASE_BELOW if self._busy else HOLD_ABOVE)
        return self._busy


#: how long a refused connection is read, and what comes dropped, before it is closed
LINGER_SECONDS = 5.0
#: the ioctl that gives what a socket's send queue holds that the peer has not acknowledged
#: (Linux's SIOCOUTQ); without it a client is seen reading only once the kernel takes more
KERNEL_SEND_QUEUE: int | None = getattr(termios, "TIOCOUTQ", None)

#: the process's CPU time is the process's, whichever server or loop in it asks
PROCESS_LOAD = LoadWatch()
#: during a drain, how long a connection with no request yet is left open for its first
FIRST_REQUEST_GRACE = 1.0
#: how soon a connection the grace found with a request unread is looked at again
UNREAD_RECHECK = 0.05


class CoalescingTransport:
    """A connection's transport whose writes wait for the end of the loop turn, or for the end
    of the response when no other request is in progress (``in_progress`` holds only this one)
    or the process is not busy (``load``)."""

    # The socket transport's own methods, taken once: uvicorn calls some of them per request,
    # and a slot is found at once where a miss would raise before reaching ``__getattr__``.
    _FORWARDED = (
        "can_write_eof",
        "get_extra_info",
        "get_protocol",
        "get_write_buffer_limits",
        "get_write_buffer_size",
        "is_closing",
        "is_reading",
        "pause_reading",
        "resume_reading",
        "set_protocol",
        "set_write_buffer_limits",
        "write_eof",
    )
    __slots__ = ("_held", "_in_progress", "_load", "_loop", "_transport", *_FORWARDED)

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        in_progress: Sized,
        load: LoadWatch,
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._in_progress = in_progress
        self._load = load
        self._held: list[bytes] | None = None
        for name in self._FORWARDED:
            setattr(self, name, getattr(transport, name))

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            held.append(data)
        else:
            self._held = [data]
            self._loop.call_soon(self.flush)

    def response_complete(self) -> None:
        """The response's last write is done: alone or in a process with time to spare, it
        goes now; in a busy one with others in progress, at the end of the turn with theirs."""
        if len(self._in_progress) <= 1 or not self._load.busy():
            self.flush()

    def writelines(self, lines: Iterable[bytes]) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        held = self._held
        if held is None:
            return
        self._held = None
        if not self._transport.is_closing():  # as the socket's own transport does after close
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        # anything else a transport has is the socket's own
        return getattr(self._transport, name)


class LingeringClose(asyncio.Protocol):
    """A refused connection's last seconds, as nginx's lingering close: its answer is written
    and its side of the connection shut, and what the client still sends is read and dropped
    until the client closes its side, or for LINGER_SECONDS at most. Closed at once, with
    the client's request still arriving, the connection would be reset by the kernel, and
    a reset can destroy the answer before the client reads it."""

    def __init__(self, abort: Callable[[], object], loop: asyncio.AbstractEventLoop) -> None:
        self._linger = loop.call_later(LINGER_SECONDS, abort)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes: both sides are done

    def connection_lost(self, exc: Exception | None) -> None:
        self._linger.cancel()


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `CoalescingTransport`; ``Config(http=...)``.

    With an app that offers client limits in its lifespan state (the gateway), its
    connections are held to them.
    """

    transport: CoalescingTransport  # type: ignore[assignment]
    # what the stall sweep notes (client_limits.StallableConnection)
    head_seen: object | None = None
    head_seen_at = 0.0
    writes_paused_at = 0.0
    unsent_seen = 0
    #: bytes read for the current head, still incomplete, after the read it began in
    head_bytes = 0
    #: a head refused behind a request in progress; the refusal follows that request's answer
    refusal_pending = False
    _limits: ClientLimits | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing = CoalescingTransport(transport, self.loop, self.tasks, PROCESS_LOAD)
        super().connection_made(coalescing)  # type: ignore[arg-type]
        limits = self.app_state.get(LIMITS_STATE)
        if isinstance(limits, ClientLimits):
            self._limits = limits
            # a new connection waits for its first head from now, as nginx's does
            self.head_seen, self.head_seen_at = self, self.loop.time()
            limits.watch(self)

    def data_received(self, data: bytes) -> None:
        if self.refusal_pending:
            # Nothing more of this connection is parsed or kept. The request in progress
            # resumes reading whenever its task asks for its body or waits for a disconnect,
            # so reading is paused again here.
            self.flow.pause_reading()
            return
        before = self.scope
        HttpToolsProtocol.data_received(self, data)  # not super(): a call Python inlines
        scope = self.scope
        if scope is not None and "method" not in scope:
            # This read left a head incomplete: what is buffered for it is bounded. A read
            # that a head begins in may hold whole requests before it (pipelined), so it
            # counts for nothing; each later read went to that head alone, and counts whole.
            if scope is before:
                self.head_bytes += len(data)
                limits = self._limits
                if limits is not None and self.head_bytes > limits.server.max_header_bytes:
                    self._head_too_large(limits)
            else:
                self.head_bytes = 0
        elif self.head_bytes:
            self.head_bytes = 0

    def _head_too_large(self, limits: ClientLimits) -> None:
        if self.transport.is_closing():
            return
        limits.closed(HEADER_TOO_LARGE)
        maximum = limits.server.max_header_bytes
        error = HeaderTooLargeError(f"the request's head is over {maximum} bytes")
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self._refuse(error)
            return
        # A head behind a request still in progress (pipelined): nothing more is read, and
        # the refusal follows that request's answer.
        self.refusal_pending = True
        self.flow.pause_reading()
        answered = cycle.on_response

        def refuse_once_answered() -> None:
            answered()
            if not self.transport.is_closing():
                self._refuse(error)

        cycle.on_response = refuse_once_answered

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # The request's last byte is in: reading its body cannot wait. Its signals begin
        # here, since a request needs them only once its body is whole (it waits on the model
        # server, or its answer stalls, after that); a body still arriving is read with a
        # timer, as under a server that gives none.
        signals = RequestSignals()
        signals.body_complete = True
        self.scope["extensions"] = {EXTENSION: signals}  # type: ignore[dict-item]
        limits = self._limits
        if limits is not None and limits.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered with Connection: close, then closed

    def shutdown(self) -> None:
        limits = self._limits
        if limits is not None and limits.draining and self.cycle is None:
            # A connection the drain took whose first request has not arrived: the client
            # made it to send one. It is answered (and closed), or closed once it has
            # had a moment to come, not reset with a request on its way.
            self.loop.call_later(FIRST_REQUEST_GRACE, self._close_if_idle)
            return
        super().shutdown()

    def _close_if_idle(self) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            if _unread(self.transport) > 0:
                # A request came that the loop has not read yet: a loop held up past the
                # grace runs its due timers before it reads. It is read and answered first;
                # uvicorn's shutdown_timeout still bounds the wait.
                self.loop.call_later(UNREAD_RECHECK, self._close_if_idle)
                return
            self.transport.close()
        else:
            cycle.keep_alive = False

    def on_response_complete(self) -> None:
        # uvicorn calls this right after a response's last write; the request's task is
        # still in ``tasks`` then
        self.transport.response_complete()
        super().on_response_complete()

    def timeout_keep_alive_handler(self) -> None:
        scope = self.scope
        if scope is not None and "method" not in scope:
            # A head that came behind the last answer, still incomplete: uvicorn armed this
            # timer after that answer, and only a read cancels it. The head is held to
            # client_header_timeout (the sweep), as one begun on an idle connection is, and
            # not closed without a word.
            return
        super().timeout_keep_alive_handler()

    def pause_writing(self) -> None:
        # the client's socket buffer is full: from now on the client is not reading, until
        # a sweep sees less unsent
        self.writes_paused_at = self.loop.time()
        self.unsent_seen = self.unsent()
        super().pause_writing()

    def resume_writing(self) -> None:
        self.writes_paused_at = 0.0
        super().resume_writing()

    def unsent(self) -> int:
        # The kernel's queue as well as the transport's: the kernel takes more from the
        # transport only once a large part of its own queue has gone (its send buffer
        # grows to megabytes), so while a client reads slowly the transport's share can
        # stay the same for seconds; the kernel's shrinks as the client reads.
        held: int = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if KERNEL_SEND_QUEUE is None or sock is None:
            return held
        try:
            queue = fcntl.ioctl(sock.fileno(), KERNEL_SEND_QUEUE, b"\0\0\0\0")
        except OSError:
            return held
        kernel: int = struct.unpack("i", queue)[0]
        return held + kernel

    def waiting_for_head(self) -> object | None:
        if self.transport.is_closing():
            return None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return None  # a request is being served; a head behind it waits its turn
        scope = cast(dict[str, Any] | None, self.scope)
        if scope is None:
            return self  # a new connection, nothing received yet
        if "method" in scope:
            return None  # the last head is complete: idle, under uvicorn's keep-alive timer
        return scope  # a head begun and not complete: uvicorn's parser made this scope for it

    def head_timed_out(self) -> bool:
        if self.scope is None:
            self.transport.close()  # nothing to answer, as nginx does
            return False
        assert self._limits is not None
        timeout = self._limits.server.client_header_timeout
        self._refuse(
            RequestTimeoutError(f"the request's head did not arrive in full within {timeout:g} s")
        )
        return True

    def _refuse(self, error: GatewayError) -> None:
        """Answer a request whose head never came whole with ``error``, as uvicorn answers
        its own 400, and let the connection go (``LingeringClose``). The body is in the
        shape of the path's protocol when the path was read before the head stopped."""
        # the target as far as uvicorn's parser read it (its on_url), for the protocol's shape
        target: bytes = getattr(self, "url", b"") or b""
        body = error.body(target.split(b"?", 1)[0].decode("latin-1"))
        # uvicorn's own table of status lines, as its other answers are written
        head = [name + b": " + value for name, value in self.server_state.default_headers]
        head += [
            ERROR_CODE_HEADER + b": " + error.code.encode(),
            b"content-type: application/json",
            b"content-length: " + str(len(body)).encode(),
            b"connection: close",
        ]
        transport = self.transport
        transport.write(STATUS_LINE[error.status] + b"\r\n".join(head) + b"\r\n\r\n" + body)
        transport.flush()  # the answer goes before the end of the connection's writes
        transport.write_eof()
        # the connection is no longer this protocol's, nor a connection the server serves
        self.connections.discard(self)
        if self._limits is not None:
            self._limits.forget(self)
        self._unset_keepalive_if_required()
        transport.set_protocol(LingeringClose(transport.abort, self.loop))

    def send_timed_out(self) -> None:
        assert self._limits is not None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # the request's task learns why its client is gone
            signals = _signals_of(cycle.scope)
            if signals is not None:
                timeout = self._limits.server.send_timeout
                signals.send_timed_out = f"send_timeout: the client read nothing for {timeout:g} s"
        self.transport.abort()  # a close would wait for the unread answer to leave

    def connection_lost(self, exc: Exception | None) -> None:
        if self._limits is not None:
            self._limits.forget(self)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            signals = _signals_of(cycle.scope)
            if signals is not None and signals.waiting is not None:
                signals.client_gone = True
                signals.waiting.cancel()
        super().connection_lost(exc)


def _unread(transport: Any) -> int:
    """Bytes the kernel holds for the connection that nobody has read (FIONREAD)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        found = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    unread: int = struct.unpack("i", found)[0]
    return unread


def _signals_of(scope: Any) -> RequestSignals | None:
    signals: RequestSignals | None = scope.get("extensions", {}).get(EXTENSION)
    return signals
