"""The client sends a small request in one write, streams large ones uncopied, gives every socket
operation what is left of the call's deadline, and reads an early answer after a failed send."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from veil.client.transport import _GATHER_BYTES, HttpClient, _Conn, _Deadline, _Writer
from veil.errors import TransportError

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class Recorder:
    """A socket that records what it is asked to do, and answers each read with the next of
    `answers`. Its descriptor is a real socket's that never becomes readable (the idle check)."""

    def __init__(self, *answers: bytes, fail_sends: bool = False) -> None:
        self.calls: list[tuple[str, object]] = []
        self.answers = list(answers)
        self.fail_sends = fail_sends
        self._pair = socket.socketpair()

    def fileno(self) -> int:
        return self._pair[0].fileno()

    def settimeout(self, seconds: float | None) -> None:
        self.calls.append(("timeout", seconds))

    def sendall(self, data: bytes) -> None:
        self.calls.append(("send", data))
        if self.fail_sends:
            raise BrokenPipeError(32, "Broken pipe")

    def recv(self, size: int) -> bytes:
        self.calls.append(("recv", size))
        return self.answers.pop(0) if self.answers else b""

    def close(self) -> None:
        self.calls.append(("close", None))
        for end in self._pair:
            end.close()

    def sends(self) -> list[bytes]:
        return [data for name, data in self.calls if name == "send"]  # type: ignore[misc]

    def names(self) -> list[str]:
        return [name for name, _ in self.calls if name != "timeout"]


class OnRecorder(HttpClient):
    """A client whose one connection is `recorder`."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder
        self.opened = 0

    def _open(self, origin: tuple[str, str, int], url: str, deadline: _Deadline) -> _Conn:
        self.opened += 1
        return _Conn(self.recorder)  # type: ignore[arg-type]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    made = Recorder(OK, OK, OK)
    yield made
    for end in made._pair:
        end.close()


def post(client: HttpClient, body: object, **headers: str) -> tuple[int, bytes]:
    status, _, answer = client.request(
        "POST", "http://h:1/run", body=body, headers=headers, timeout=30, max_body=99
    )  # type: ignore[arg-type]
    return status, answer


def test_head_and_body_of_a_small_request_leave_as_one_write_before_the_read(
    recorder: Recorder,
) -> None:
    assert post(OnRecorder(recorder), b"0123456789") == (200, b"ok")
    assert recorder.names() == ["send", "recv"]
    (request,) = recorder.sends()
    assert request.startswith(b"POST /run HTTP/1.1\r\nhost: h:1\r\n")
    assert request.endswith(b"content-length: 10\r\n\r\n0123456789")


def test_each_request_on_a_kept_alive_connection_is_one_write(recorder: Recorder) -> None:
    client = OnRecorder(recorder)
    for n in range(3):
        assert post(client, b"body%d" % n) == (200, b"ok")
    assert client.opened == 1
    assert recorder.names() == ["send", "recv"] * 3
    assert [request[-5:] for request in recorder.sends()] == [b"body0", b"body1", b"body2"]


def test_a_large_body_is_not_held_and_not_copied(recorder: Recorder) -> None:
    body = b"x" * (4 * _GATHER_BYTES)
    post(OnRecorder(recorder), body)
    head, sent = recorder.sends()
    assert head.endswith(b"content-length: %d\r\n\r\n" % len(body))
    assert sent is body
    assert recorder.names() == ["send", "send", "recv"]


def test_a_streamed_body_goes_out_in_gathered_pieces(recorder: Recorder) -> None:
    piece = b"y" * (_GATHER_BYTES // 4)
    total = str(8 * len(piece))
    post(OnRecorder(recorder), iter([piece] * 8), **{"content-length": total})
    head, *pieces = recorder.sends()
    # Held until the next piece would fill the gather size: what is held goes, then that piece
    # (uncopied); the head leaves with the first three.
    assert head.startswith(b"POST /run")
    assert head.endswith(b"\r\n\r\n" + piece * 3)
    assert pieces == [piece, piece * 3, piece]
    assert recorder.names()[-1] == "recv"


def test_every_socket_operation_gets_what_is_left_of_the_deadline(recorder: Recorder) -> None:
    client = OnRecorder(recorder)
    client.request("GET", "http://h:1/", timeout=30, max_body=9)
    timeouts = [seconds for name, seconds in recorder.calls if name == "timeout"]
    assert len(timeouts) == 2  # one send, one receive
    assert all(isinstance(t, float) and 0 < t <= 30 for t in timeouts)


def test_a_deadline_that_has_passed_sends_nothing(recorder: Recorder) -> None:
    writer = _Writer(recorder, _Deadline(30))  # type: ignore[arg-type]
    writer.write(b"held")
    assert recorder.calls == []
    writer._deadline = _Deadline(0)  # passed by the time anything checks it, whatever the load
    with pytest.raises(TimeoutError, match="total deadline passed"):
        writer.flush()
    assert recorder.sends() == []
    with pytest.raises(TransportError, match=r"http://h:1/: WriteTimeout: .*deadline passed"):
        OnRecorder(recorder).request("GET", "http://h:1/", timeout=0, max_body=9)
    assert recorder.sends() == []


def test_a_failed_send_still_reads_the_servers_early_answer() -> None:
    early = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 3\r\n\r\nbig"
    recorder = Recorder(early, fail_sends=True)
    client = OnRecorder(recorder)
    assert post(client, bytes(4 * _GATHER_BYTES)) == (413, b"big")
    # The head failed: the body is not tried, and the connection is not kept.
    assert recorder.names() == ["send", "recv", "close"]
    assert client._idle == {}


def test_a_failed_send_without_an_answer_is_the_error() -> None:
    recorder = Recorder(fail_sends=True)
    with pytest.raises(TransportError, match=r"http://h:1/run: WriteError: .*Broken pipe"):
        post(OnRecorder(recorder), b"body")
    assert recorder.names() == ["send", "recv", "close"]
