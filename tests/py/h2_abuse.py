"""Misbehaving HTTP/2 clients against the gateway's h2c listener, built with
the `h2` library (python-hyper) for the legal parts and raw frames for the
illegal ones. Each scenario prints one JSON line of what it saw; the Rust
test decides.

usage: h2_abuse.py HOST:PORT SCENARIO
  rapid_reset     open a stream to a slow path and reset it, 2000 times
  continuation    HEADERS without END_HEADERS, then CONTINUATION frames forever
  ping_flood      100000 PINGs without reading the answers, then one request
  settings_flood  20000 SETTINGS without reading the answers, then one request
  streams         open 200 streams to a slow path at once
  big_header      one request with a 64 KiB header
"""

import json
import socket
import struct
import sys
import time

import h2.config
import h2.connection
import h2.events

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def connect(addr):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    return s, conn


def headers(path, authority="t"):
    return [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", path)]


def read_until_closed(s, conn, seconds):
    """Read frames until the gateway closes the connection or `seconds` pass:
    (goaway error code or None, closed, events)."""
    end = time.time() + seconds
    goaway, closed, events = None, False, []
    s.settimeout(0.5)
    while time.time() < end:
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            closed = True
            break
        if not data:
            closed = True
            break
        try:
            for e in conn.receive_data(data):
                events.append(type(e).__name__)
                if isinstance(e, h2.events.ConnectionTerminated):
                    goaway = int(e.error_code)
        except Exception as ex:  # the gateway's frames after our own violation
            events.append("error:" + type(ex).__name__)
        try:
            s.sendall(conn.data_to_send())
        except OSError:
            pass
    return goaway, closed, events


def rapid_reset(addr):
    s, conn = connect(addr)
    sent = 0
    try:
        for _ in range(2000):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers("/slow?ms=3000"), end_stream=True)
            conn.reset_stream(sid)
            s.sendall(conn.data_to_send())
            sent += 1
    except (OSError, h2.exceptions.ProtocolError):
        pass
    goaway, closed, _ = read_until_closed(s, conn, 5)
    return {"sent": sent, "goaway": goaway, "closed": closed}


def continuation(addr):
    s, conn = connect(addr)
    # A legal header block start: the HPACK of the request, no END_HEADERS.
    enc = conn.encoder.encode(headers("/x"))
    sent = 0
    try:
        s.sendall(frame(0x1, 0x1, 1, enc))  # HEADERS, END_STREAM, no END_HEADERS
        junk = conn.encoder.encode([("x-junk", "a" * 4000)])
        for _ in range(5000):
            s.sendall(frame(0x9, 0x0, 1, junk))  # CONTINUATION, never ending
            sent += len(junk)
    except OSError:
        pass
    goaway, closed, _ = read_until_closed(s, conn, 5)
    return {"sent_bytes": sent, "goaway": goaway, "closed": closed}


def answer_after(s, conn, path="/x"):
    """One request after the flood: its status (0: none)."""
    try:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers(path), end_stream=True)
        s.sendall(conn.data_to_send())
    except (OSError, h2.exceptions.ProtocolError):
        return 0
    end = time.time() + 10
    s.settimeout(1)
    while time.time() < end:
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return 0
        if not data:
            return 0
        for e in conn.receive_data(data):
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                return int(dict(e.headers)[":status"])
        s.sendall(conn.data_to_send())
    return 0


def flood(addr, kind, n):
    s, conn = connect(addr)
    sent = 0
    payload = frame(0x6, 0, 0, b"12345678") if kind == "ping" else frame(0x4, 0, 0, b"")
    batch = payload * 100
    s.settimeout(2)
    try:
        for _ in range(n // 100):
            s.sendall(batch)
            sent += 100
    except (socket.timeout, OSError):
        pass
    status = answer_after(s, conn)
    return {"sent": sent, "status_after": status}


def streams(addr):
    s, conn = connect(addr)
    ids = []
    for _ in range(200):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers("/slow?ms=1500"), end_stream=True)
        ids.append(sid)
    s.sendall(conn.data_to_send())
    statuses, refused = {}, 0
    end = time.time() + 15
    s.settimeout(1)
    while time.time() < end and len(statuses) + refused < len(ids):
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        if not data:
            break
        for e in conn.receive_data(data):
            if isinstance(e, h2.events.ResponseReceived):
                statuses[e.stream_id] = int(dict(e.headers)[":status"])
            elif isinstance(e, h2.events.StreamReset):
                refused += 1
        s.sendall(conn.data_to_send())
    return {
        "ok": sum(1 for v in statuses.values() if v == 200),
        "refused": refused,
        "max_concurrent_streams": conn.remote_settings.max_concurrent_streams,
    }


def big_header(addr):
    s, conn = connect(addr)
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers("/x") + [("x-big", "b" * 65536)], end_stream=True)
    s.sendall(conn.data_to_send())
    status, reset, goaway = 0, None, None
    end = time.time() + 5
    s.settimeout(1)
    while time.time() < end and not status and reset is None and goaway is None:
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not data:
            break
        for e in conn.receive_data(data):
            if isinstance(e, h2.events.ResponseReceived):
                status = int(dict(e.headers)[":status"])
            elif isinstance(e, h2.events.StreamReset):
                reset = int(e.error_code)
            elif isinstance(e, h2.events.ConnectionTerminated):
                goaway = int(e.error_code)
    return {"status": status, "reset": reset, "goaway": goaway}


def main():
    addr, scenario = sys.argv[1], sys.argv[2]
    result = {
        "rapid_reset": rapid_reset,
        "continuation": continuation,
        "ping_flood": lambda a: flood(a, "ping", 100000),
        "settings_flood": lambda a: flood(a, "settings", 20000),
        "streams": streams,
        "big_header": big_header,
    }[scenario](addr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
