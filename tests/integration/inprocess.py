"""The production apps served in process from a thread, for tests that build the server's state
themselves (`veil.server.runner.prepare_state`) and change it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from veil.server.app import ServerState, build_apps
from veil.server.runner import close_connections
from veil.tls import TlsIdentity


def _listen() -> socket.socket:
    # proto=IPPROTO_TCP, as the runner does: asyncio then sets TCP_NODELAY on accepted sockets,
    # without which each response waits for the peer's delayed ACK (~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@contextmanager
def listening(state: ServerState, identity: TlsIdentity | None = None) -> Iterator[dict[str, int]]:
    """The three apps on loopback ports; yields the ports `veil.connect` takes.

    The TLS ports present `state.keys`' identity and follow its rotations, as the runner's do;
    `identity` (what `prepare_state` returned with `state`) is that identity, or None.
    """
    if identity is not None:
        assert identity.certificate_der == state.keys.current.certificate_der
    apps = build_apps(state)
    sockets = [_listen() for _ in apps]
    servers = []
    # As the runner says it: clients refuse a simulated server unless told to accept one.
    header = [("server", "veil mock" if state.simulated else "veil")]
    for app, tls in zip(apps, (False, True, True), strict=True):
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", server_header=False, headers=header
        )
        config.load()
        if tls:
            config.ssl = state.keys.server_context
        servers.append(uvicorn.Server(config))
    state.keys.on_rotate(lambda: close_connections(servers[1:]))

    async def run() -> None:
        await asyncio.gather(
            *(s.serve(sockets=[sock]) for s, sock in zip(servers, sockets, strict=True))
        )

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    try:
        while not all(s.started for s in servers):
            time.sleep(0.01)
        names = ("unattested_port", "attested_port", "management_port")
        yield {n: sock.getsockname()[1] for n, sock in zip(names, sockets, strict=True)}
    finally:
        for s in servers:
            s.should_exit = True
        thread.join(timeout=10)
        for sock in sockets:
            sock.close()
