"""NVIDIA's tritonclient (gRPC) through the gateway's KServe v2 gRPC route,
against a small Open Inference Protocol gRPC server built on the same
generated service (tritonclient.grpc.service_pb2_grpc): an identity model
`simple` that returns each input as `OUT_<name>`, and the health and
metadata calls.

usage: triton_grpc.py server PORT
       triton_grpc.py client GATEWAY_ADDR KEY
The client prints one JSON object: what each call saw.
"""

import json
import sys
from concurrent import futures

import grpc
import numpy as np
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException


class Identity(service_pb2_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, req, ctx):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, req, ctx):
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, req, ctx):
        return service_pb2.ModelReadyResponse(ready=req.name == "simple")

    def ModelMetadata(self, req, ctx):
        return service_pb2.ModelMetadataResponse(name=req.name, versions=["1"], platform="identity")

    def ModelInfer(self, req, ctx):
        resp = service_pb2.ModelInferResponse(model_name=req.model_name, id=req.id)
        for i, t in enumerate(req.inputs):
            o = resp.outputs.add()
            o.name = "OUT_" + t.name
            o.datatype = t.datatype
            o.shape.extend(t.shape)
            if req.raw_input_contents:
                resp.raw_output_contents.append(req.raw_input_contents[i])
            else:
                o.contents.CopyFrom(t.contents)
        return resp


def serve(port):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Identity(), server)
    server.add_insecure_port("127.0.0.1:%s" % port)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def status_of(fn):
    try:
        return {"ok": True, "value": fn()}
    except InferenceServerException as e:
        return {"ok": False, "status": str(e.status()), "message": e.message()}
    except grpc.RpcError as e:
        return {"ok": False, "status": e.code().name, "message": e.details()}


def client(addr, key):
    headers = {"authorization": "Bearer " + key}
    c = tc.InferenceServerClient(url=addr)
    out = {}
    out["live"] = status_of(lambda: c.is_server_live(headers=headers))
    out["ready"] = status_of(lambda: c.is_model_ready("simple", headers=headers))
    out["metadata"] = status_of(lambda: c.get_model_metadata("simple", headers=headers, as_json=True)["name"])

    data = np.arange(16, dtype=np.int32).reshape(1, 16)

    def infer(model):
        i = tc.InferInput("INPUT0", [1, 16], "INT32")
        i.set_data_from_numpy(data)
        r = c.infer(model, [i], headers=headers)
        return r.as_numpy("OUT_INPUT0").tolist()

    out["infer"] = status_of(lambda: infer("simple"))
    out["unknown_model"] = status_of(lambda: infer("nope"))
    out["no_key"] = status_of(lambda: c.infer("simple", [tc.InferInput("INPUT0", [1], "INT32")]))

    # A request the client library would not build: 60 raw bytes for 16 INT32s.
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(addr))
    bad = service_pb2.ModelInferRequest(model_name="simple")
    t = bad.inputs.add()
    t.name, t.datatype = "INPUT0", "INT32"
    t.shape.extend([1, 16])
    bad.raw_input_contents.append(b"\0" * 60)
    out["bad_raw"] = status_of(lambda: stub.ModelInfer(bad, metadata=tuple(headers.items()), timeout=10))
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(sys.argv[2])
    else:
        client(sys.argv[2], sys.argv[3])
