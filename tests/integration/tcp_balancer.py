"""A small L4 (TCP passthrough) round-robin balancer on loopback, standing in for HAProxy.

Each front port forwards whole connections to the same-numbered port of the next backend that
accepts one; TLS passes through untouched, so a client sees whichever replica it reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Callable, Sequence


class TcpBalancer:
    """Front ports (one per backend port kind) forwarding to `backends`, round robin."""

    def __init__(self, backends: Sequence[Sequence[int]]) -> None:
        self._backends = [list(ports) for ports in backends]
        # (front port index, bytes): the next connection there that has sent that many bytes
        # loses the server's answer (both sides closed): an acknowledgement lost in flight.
        self.lose_answer_after: tuple[int, int] | None = None
        self._next = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self.ports: list[int] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> TcpBalancer:
        self._thread.start()
        for kind in range(len(self._backends[0])):
            server = asyncio.run_coroutine_threadsafe(self._listen(kind), self._loop).result(10)
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
            current = asyncio.current_task()
            pipes = [task for task in asyncio.all_tasks() if task is not current]
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _listen(self, kind: int) -> asyncio.Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            start = next(self._next)
            for i in range(len(self._backends)):
                port = self._backends[(start + i) % len(self._backends)][kind]
                try:
                    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                    break
                except OSError:
                    continue
            else:
                writer.close()
                return
            armed = self.lose_answer_after
            if armed is not None and armed[0] == kind:
                self.lose_answer_after = None
                sent = [0]

                def count(n: int) -> bool:
                    sent[0] += n
                    return True

                def answer(n: int) -> bool:
                    return sent[0] < armed[1]  # once the request is in, cut the answer

                await asyncio.gather(
                    _pipe(reader, up_writer, count), _pipe(up_reader, writer, answer, up_writer)
                )
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    allow: Callable[[int], bool] | None = None,
    other: asyncio.StreamWriter | None = None,
) -> None:
    try:
        while data := await reader.read(1 << 16):
            if allow is not None and not allow(len(data)):
                if other is not None:
                    other.close()
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()
