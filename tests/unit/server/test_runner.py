"""Listening sockets of `veil serve`."""

from __future__ import annotations

import asyncio
import socket

import pytest

from veil.server.runner import _listen


def test_accepted_connections_get_tcp_nodelay() -> None:
    # Without TCP_NODELAY a response body written after its headers waits for the client's
    # delayed ACK: 40 ms per request. asyncio sets it only when the socket's proto says TCP.
    async def main() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        listener = _listen("127.0.0.1", 0)
        server = await asyncio.start_server(accepted, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname())
            value = await asyncio.wait_for(seen, 10)
            writer.close()
            await writer.wait_closed()
        return value

    assert asyncio.run(main()) != 0


def test_taken_port_names_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            _listen("127.0.0.1", port)
