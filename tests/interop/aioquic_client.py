"""Interop client: publishes to edgerelay with aioquic, an independent QUIC stack.

Two modes, both printing one JSON line per event answer to stdout:
  native  ALPN edgerelay/1: varint-length-delimited PublishRequest frames on one bidirectional
          stream, PublishResponse frames back in order (protobuf encoded by hand from
          proto/edgerelay/v1/edgerelay.proto, so this is also a check that the documented
          wire format is enough to write a client).
  h3      HTTP/3: POST /v1/publish/{subject} per event.

usage: aioquic_client.py MODE HOST PORT CA_FILE TOKEN SUBJECT PAYLOAD...
"""

import asyncio
import json
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


# --- protobuf by hand ---------------------------------------------------------------------

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number, wire_type, value):
    key = varint((number << 3) | wire_type)
    if wire_type == 2:
        return key + varint(len(value)) + value
    return key + varint(value)


def publish_request(token, events):
    """PublishRequest{events=1: Event{subject=1, payload=2, id=4}, token=2}, token field first
    (any field order is valid protobuf; the relay authenticates a large first frame from its
    first 16 KiB, so the token goes there)."""
    body = field(2, 2, token.encode()) if token else b""
    for subject, payload, event_id in events:
        ev = field(1, 2, subject.encode()) + field(2, 2, payload.encode()) + field(4, 2, event_id.encode())
        body += field(1, 2, ev)
    return body


def read_varint(buf, pos):
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def fields(buf):
    """Yields (number, value) of a protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = read_varint(buf, pos)
        elif wire_type == 2:
            length, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise ValueError(f"unexpected wire type {wire_type}")
        yield number, value


def decode_response(buf):
    """PublishResponse{results=1: EventResult{accepted=1|refused=2}, error=2: Refused}."""
    answers = []
    for number, value in fields(buf):
        if number == 2:
            return [{"error": {k: v.decode() if isinstance(v, bytes) else v for k, v in _refused(value).items()}}]
        if number == 1:
            for kind, inner in fields(value):
                if kind == 1:
                    a = dict(fields(inner))
                    answers.append({"stream": a.get(1, b"").decode(), "seq": a.get(2, 0),
                                    "batch": a.get(3, b"").decode(), "index": a.get(4, 0),
                                    "duplicate": bool(a.get(5, 0))})
                elif kind == 2:
                    answers.append({"error": {k: v.decode() if isinstance(v, bytes) else v
                                              for k, v in _refused(inner).items()}})
    return answers


def _refused(buf):
    f = dict(fields(buf))
    return {"code": f.get(1, b""), "message": f.get(2, b"")}


# --- native protocol ----------------------------------------------------------------------

async def native(host, port, config, token, subject, payloads):
    config.alpn_protocols = ["edgerelay/1"]
    async with connect(host, port, configuration=config) as client:
        reader, writer = await client.create_stream()
        # Pipelined: one request per payload, all written before any answer is read.
        for i, p in enumerate(payloads):
            req = publish_request(token if i == 0 else "", [(subject, p, f"aioquic-native-{i}")])
            writer.write(varint(len(req)) + req)
        writer.write_eof()
        for _ in payloads:
            length = 0
            shift = 0
            while True:
                b = (await reader.readexactly(1))[0]
                length |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            for answer in decode_response(await reader.readexactly(length)):
                print(json.dumps(answer), flush=True)


# --- HTTP/3 ---------------------------------------------------------------------------------

class H3Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.waiting = {}

    async def post(self, authority, path, headers, body):
        stream_id = self._quic.get_next_available_stream_id()
        self.h3.send_headers(stream_id, [(b":method", b"POST"), (b":scheme", b"https"),
                                         (b":authority", authority.encode()), (b":path", path.encode())]
                             + [(k.encode(), v.encode()) for k, v in headers], end_stream=False)
        self.h3.send_data(stream_id, body, end_stream=True)
        done = asyncio.get_running_loop().create_future()
        self.waiting[stream_id] = (done, {}, bytearray())
        self.transmit()
        return await asyncio.wait_for(done, 10)

    def quic_event_received(self, event):
        for e in self.h3.handle_event(event):
            entry = self.waiting.get(e.stream_id)
            if entry is None:
                continue
            done, headers, body = entry
            if isinstance(e, HeadersReceived):
                headers.update({k.decode(): v.decode() for k, v in e.headers})
            elif isinstance(e, DataReceived):
                body.extend(e.data)
            if getattr(e, "stream_ended", False) and not done.done():
                done.set_result((int(headers.get(":status", "0")), bytes(body)))


async def h3(host, port, config, token, subject, payloads):
    config.alpn_protocols = H3_ALPN
    async with connect(host, port, configuration=config, create_protocol=H3Client) as client:
        for i, p in enumerate(payloads):
            status, body = await client.post(
                "localhost", f"/v1/publish/{subject}",
                [("authorization", f"Bearer {token}"), ("idempotency-key", f"aioquic-h3-{i}")],
                p.encode())
            answer = json.loads(body)
            answer["status"] = status
            print(json.dumps(answer), flush=True)


def main():
    mode, host, port, ca, token, subject, *payloads = sys.argv[1:]
    config = QuicConfiguration(is_client=True, server_name="localhost")
    config.load_verify_locations(ca)
    run = {"native": native, "h3": h3}[mode]
    asyncio.run(run(host, int(port), config, token, subject, payloads))


if __name__ == "__main__":
    main()
