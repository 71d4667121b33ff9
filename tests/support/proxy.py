"""A TCP forwarder to cut, stall and restore the network path to a server (the machine's RabbitMQ, which
cannot be restarted cheaply, included)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self, TypeVar

from listener.throwaway import LOCALHOST, free_port

__all__ = ["TcpProxy"]

_T = TypeVar("_T")


class TcpProxy:
    """A TCP forwarder from 127.0.0.1:PORT to ``target_host:target_port``, to cut and restore the
    network path to a server: ``stop()`` closes the listening port and every open connection (clients
    see the server go away), ``start()`` serves again on the same port, ``pause()`` / ``resume()``
    stop and restart the flow of bytes while connections stay open (a network stall).

    It runs on its own event loop in a daemon thread, so it works from synchronous and asynchronous
    code alike.
    """

    def __init__(self, target_host: str, target_port: int, *, port: int | None = None, host: str = LOCALHOST) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._host = host
        self._port = port if port is not None else free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def connections(self) -> int:
        """Open client connections."""
        return len(self._tasks)

    def _call(self, factory: Callable[[], Awaitable[_T]], timeout: float = 15.0) -> _T:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name=f"tcp-proxy-{self._port}", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread

        async def run() -> _T:
            return await factory()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def start(self) -> Self:
        """Listen (again) on the proxy's port. No-op when running."""
        self._call(self._start)
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection."""
        if self._loop is not None:
            self._call(self._stop)

    def pause(self) -> None:
        """Hold every byte in both directions; connections stay open."""
        if self._loop is not None and self._flowing is not None:
            self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        if self._loop is not None and self._flowing is not None:
            self._loop.call_soon_threadsafe(self._flowing.set)

    def close(self) -> None:
        """``stop()`` and end the proxy's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<TcpProxy {state} {self.address} -> {self.target_host}:{self.target_port}>"

    # -- on the proxy's loop

    async def _start(self) -> None:
        if self._flowing is None:
            self._flowing = asyncio.Event()
        self._flowing.set()
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, self._host, self._port, reuse_address=True)

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        upstream_w: asyncio.StreamWriter | None = None
        try:
            upstream_r, upstream = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), 10
            )
            upstream_w = upstream
            self._writers.add(upstream)
            pumps = [
                asyncio.create_task(self._pump(client_r, upstream)),
                asyncio.create_task(self._pump(upstream_r, client_w)),
            ]
            try:
                await asyncio.gather(*pumps)
            finally:
                for p in pumps:
                    p.cancel()
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            for w in (client_w, upstream_w):
                if w is not None:
                    w.transport.abort()
                    self._writers.discard(w)
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            # One side broke: end the other one too, or its pump would wait forever.
            writer.transport.abort()
            raise
