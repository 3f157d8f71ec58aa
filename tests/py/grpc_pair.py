"""A gRPC backend and a gRPC client (grpcio, the official Python gRPC
library) for the gateway's gRPC routes. Messages are raw bytes (no .proto
needed); the standard health service comes from grpcio-health-checking.

usage: grpc_pair.py server PORT
       grpc_pair.py server-tls PORT CERT KEY
       grpc_pair.py client GATEWAY_ADDR KEY LIMITED_KEY
The client prints one JSON object: what each call saw.
"""

import json
import sys
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def ident(b):
    return b


def serve(port, tls=None):
    def unary(req, ctx):
        ctx.set_trailing_metadata((("x-backend-trailer", "yes"),))
        return b"echo:" + req

    def server_stream(req, ctx):
        for i in range(5):
            yield b"%d:" % i + req

    def bidi(reqs, ctx):
        for r in reqs:
            yield b"re:" + r

    def fail(req, ctx):
        ctx.abort(grpc.StatusCode.NOT_FOUND, "nope, not here")

    def slow(req, ctx):
        time.sleep(2)
        return b"late"

    def who(req, ctx):
        md = dict(ctx.invocation_metadata())
        return json.dumps({k: md.get(k) for k in ("x-request-id", "x-forwarded-for", "authorization")}).encode()

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, ident, ident),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, ident, ident),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, ident, ident),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, ident, ident),
        "Slow": grpc.unary_unary_rpc_method_handler(slow, ident, ident),
        "Who": grpc.unary_unary_rpc_method_handler(who, ident, ident),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    h = health.HealthServicer()
    h.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    if tls:
        cert, key = (open(p, "rb").read() for p in tls)
        server.add_secure_port("127.0.0.1:%s" % port, grpc.ssl_server_credentials([(key, cert)]))
    else:
        server.add_insecure_port("127.0.0.1:%s" % port)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def call(fn):
    try:
        v = fn()
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        return {"ok": True, "value": v}
    except grpc.RpcError as e:
        md = dict(e.trailing_metadata() or ())
        return {
            "ok": False,
            "code": e.code().name,
            "details": e.details(),
            "pushback": md.get("grpc-retry-pushback-ms"),
        }


def client(addr, key, limited):
    ch = grpc.insecure_channel(addr)
    auth = (("authorization", "Bearer " + key),)
    lim = (("authorization", "Bearer " + limited),)
    u = ch.unary_unary("/test.Echo/Unary")
    out = {}

    def unary():
        resp, c = u.with_call(b"hello", metadata=auth, timeout=10)
        return {"resp": resp.decode(), "trailer": dict(c.trailing_metadata()).get("x-backend-trailer")}

    out["unary"] = call(unary)
    out["server_stream"] = call(
        lambda: [m.decode() for m in ch.unary_stream("/test.Echo/ServerStream")(b"x", metadata=auth, timeout=10)]
    )

    def bidi():
        got = []
        it = ch.stream_stream("/test.Echo/Bidi")(iter([b"a", b"b", b"c"]), metadata=auth, timeout=10)
        for m in it:
            got.append(m.decode())
        return got

    out["bidi"] = call(bidi)
    out["fail"] = call(lambda: ch.unary_unary("/test.Echo/Fail")(b"x", metadata=auth, timeout=10))
    out["no_key"] = call(lambda: u(b"x", timeout=10))
    out["deadline"] = call(lambda: ch.unary_unary("/test.Echo/Slow")(b"x", metadata=auth, timeout=0.5))
    out["who"] = call(lambda: json.loads(ch.unary_unary("/test.Echo/Who")(b"x", metadata=auth, timeout=10)))
    stub = health_pb2_grpc.HealthStub(ch)
    out["health"] = call(lambda: health_pb2.HealthCheckResponse.ServingStatus.Name(
        stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status))
    out["limited_1"] = call(lambda: u(b"x", metadata=lim, timeout=10).decode())
    out["limited_2"] = call(lambda: u(b"x", metadata=lim, timeout=10).decode())
    out["no_route"] = call(lambda: ch.unary_unary("/other.Svc/Do")(b"x", metadata=auth, timeout=10))
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(sys.argv[2])
    elif sys.argv[1] == "server-tls":
        serve(sys.argv[2], (sys.argv[3], sys.argv[4]))
    else:
        client(sys.argv[2], sys.argv[3], sys.argv[4])
