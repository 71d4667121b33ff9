"""nats-server's own CPU per JetStream publish, by how the publish is made: raw protocol, no client library.

The listener publishes every event with a reply subject (JetStream acks each one) and a ``Nats-Msg-Id``
header (JetStream drops a replay inside the duplicate window). On the same two cores nats-server spends more
CPU than the listener, so what each of those costs the server matters. This starts its own nats-server, creates
a file stream per mode and publishes ``--messages`` messages in rounds of 2,000, waiting for each round's acks,
and prints the server's CPU per message::

    .venv/bin/python -m bench.nats_server --messages 300000 --modes ack,ack-noid,noack,atomic

Modes: ``ack`` (as the listener publishes), ``ack-noid`` (no ``Nats-Msg-Id``), ``noack`` (``Nats-Msg-Id``, no
reply subject but on each round's last message), ``atomic`` (atomic batches of 1,000 on a stream with
``allow_atomic``: ``Nats-Batch-Id``/``-Sequence``/``-Commit`` headers, the commit acked), ``fast`` (JetStream's
fast ingest, nats-server 2.14+: a stream with ``allow_batched``, each round one batch whose place is in the reply
subject ``<inbox>.<batch>.<flow>.fail.<seq>.<op>.$FI``; the server acks every 500 messages and the commit).
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import uuid
from typing import BinaryIO

import psutil

from tests.support.services import NatsServer

ROUND = 2000
BATCH = 1000
BODY = b'{"id":"x","schema":"public","table":"t","action":"INSERT","data":{"a":1,"b":"hello"}}' + b" " * 320


class Wire:
    """One raw NATS connection: publish frames, read acks."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file: BinaryIO = self.sock.makefile("rb")
        self.file.readline()  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
                          b"PING\r\n")
        if not self.file.readline().startswith(b"PONG"):
            raise RuntimeError("nats-server did not answer PING")
        self.errors = 0

    def messages(self, count: int) -> list[bytes]:
        """The payloads of the next ``count`` MSG/HMSG frames."""
        found = []
        while len(found) < count:
            line = self.file.readline()
            if line.startswith((b"MSG", b"HMSG")):
                data = self.file.read(int(line.split()[-1]) + 2)
                self.errors += b'"error"' in data
                found.append(data)
        return found

    def request(self, subject: str, payload: bytes) -> dict[str, object]:
        inbox = "_INBOX." + uuid.uuid4().hex
        self.sock.sendall(f"SUB {inbox} 99\r\nPUB {subject} {inbox} {len(payload)}\r\n".encode() + payload + b"\r\n")
        answer = self.messages(1)[0]
        self.sock.sendall(b"UNSUB 99\r\n")
        return dict(json.loads(answer))


def frame(stream: str, i: int, mode: str, last_of_round: bool, total: int) -> tuple[bytes, bool]:
    """The HPUB frame of message ``i`` and whether it asks for an ack."""
    if mode == "atomic":
        batch, k = divmod(i, BATCH)
        commit = k == BATCH - 1 or i == total - 1
        head = f"NATS/1.0\r\nNats-Msg-Id: {i:032d}\r\nNats-Batch-Id: b{batch}\r\nNats-Batch-Sequence: {k + 1}\r\n"
        head += "Nats-Batch-Commit: 1\r\n\r\n" if commit else "\r\n"
        acked = commit
    elif mode == "fast":
        k = i % ROUND
        op = 0 if k == 0 else 2 if k == ROUND - 1 or i == total - 1 else 1
        headers = f"NATS/1.0\r\nNats-Msg-Id: {i:032d}\r\n\r\n".encode()
        reply = f" ACK.b{i // ROUND}.500.fail.{k + 1}.{op}.$FI"
        return (f"HPUB {stream}.t{reply} {len(headers)} {len(headers) + len(BODY)}\r\n".encode() + headers + BODY
                + b"\r\n", op == 2)
    else:
        head = "NATS/1.0\r\n\r\n" if mode == "ack-noid" else f"NATS/1.0\r\nNats-Msg-Id: {i:032d}\r\n\r\n"
        acked = mode != "noack" or last_of_round
    headers = head.encode()
    reply = f" ACK.{i}" if acked else ""
    size = len(headers) + len(BODY)
    return f"HPUB {stream}.t{reply} {len(headers)} {size}\r\n".encode() + headers + BODY + b"\r\n", acked


def run(server: NatsServer, mode: str, total: int) -> None:
    wire = Wire(server.port)
    stream = "BENCH" + uuid.uuid4().hex[:8]
    config: dict[str, object] = {"name": stream, "subjects": [f"{stream}.>"], "storage": "file",
                                 "duplicate_window": 120_000_000_000}
    if mode == "atomic":
        config["allow_atomic"] = True
    if mode == "fast":
        config["allow_batched"] = True
    created = wire.request(f"$JS.API.STREAM.CREATE.{stream}", json.dumps(config).encode())
    if "error" in created:
        raise RuntimeError(f"{mode}: cannot create the stream: {created['error']}")
    wire.sock.sendall(b"SUB ACK.> 1\r\n")
    proc = psutil.Process(server.pid)
    before = proc.cpu_times()
    for start in range(0, total, ROUND):
        stop = min(total, start + ROUND)
        frames = [frame(stream, i, mode, i == stop - 1, total) for i in range(start, stop)]
        wire.sock.sendall(b"".join(f for f, _ in frames))
        if mode == "fast":  # flow acks, then the commit's PubAck (it names the batch)
            while b'"batch"' not in wire.messages(1)[0]:
                pass
        else:
            wire.messages(sum(acked for _, acked in frames))
    after = proc.cpu_times()
    cpu = after.user + after.system - before.user - before.system
    info = wire.request(f"$JS.API.STREAM.INFO.{stream}", b"")
    stored = info.get("state", {}).get("messages")  # type: ignore[union-attr]
    print(f"{mode:9s} nats-server {cpu:6.2f} CPU s = {cpu / total * 1e6:5.2f} µs per message"
          f" ({wire.errors} acks with an error, {stored} stored)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300_000)
    parser.add_argument("--modes", default="ack,ack-noid,noack,atomic")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(base_dir=tmp).start()
        try:
            for mode in args.modes.split(","):
                run(server, mode, args.messages)
        finally:
            server.cleanup()


if __name__ == "__main__":
    main()
