"""NVIDIA's tritonclient (HTTP) through the gateway, unmodified: readiness,
metadata, inference with JSON and binary tensors, and the client's own
InferenceServerException for every refusal.

Env: GATEWAY=host:port, KEY (an API key for the `secured` model route).
Exits non-zero with a message on the first failure.
"""
import os

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

URL = os.environ["GATEWAY"]


def headers():
    # A fresh dict per call: tritonclient adds its own headers to the one it is given.
    return {"x-api-key": os.environ["KEY"]}


def ok(name):
    print(f"ok {name}", flush=True)


def refused(fn, status, needle):
    try:
        fn()
    except InferenceServerException as e:
        assert e.status() == str(status), f"status {e.status()}, wanted {status}: {e.message()}"
        assert isinstance(e.message(), str) and needle in e.message(), f"message {e.message()!r} lacks {needle!r}"
        return
    raise AssertionError(f"wanted a {status} refusal, the call succeeded")


def main():
    c = httpclient.InferenceServerClient(url=URL)
    assert c.is_server_live(headers=headers())
    assert c.is_model_ready("simple", headers=headers())
    assert not c.is_model_ready("no-such-model", headers=headers())
    ok("readiness")

    # JSON tensors both ways.
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    i = httpclient.InferInput("INPUT0", list(a.shape), "INT32")
    i.set_data_from_numpy(a, binary_data=False)
    out = httpclient.InferRequestedOutput("OUT_INPUT0", binary_data=False)
    r = c.infer("simple", [i], outputs=[out], headers=headers())
    assert (r.as_numpy("OUT_INPUT0") == a).all(), r.get_response()
    ok("infer json")

    # Binary tensors (the client's default): FP32, UINT8 and BYTES together.
    f = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    u = np.array([[0, 255, 7]], dtype=np.uint8)
    s = np.array([b"hello", b"", b"tensor"], dtype=np.object_)
    ins = []
    for name, arr, dt in [("F", f, "FP32"), ("U", u, "UINT8"), ("S", s, "BYTES")]:
        x = httpclient.InferInput(name, list(arr.shape), dt)
        x.set_data_from_numpy(arr)
        ins.append(x)
    r = c.infer("simple", ins, headers=headers())
    assert (r.as_numpy("OUT_F") == f).all()
    assert (r.as_numpy("OUT_U") == u).all()
    assert list(r.as_numpy("OUT_S")) == list(s), r.as_numpy("OUT_S")
    ok("infer binary")

    # A binary size the shape does not give: refused by the gateway (400).
    x = httpclient.InferInput("F", [2, 4], "FP32")
    x.set_data_from_numpy(np.zeros((2, 4), dtype=np.float32))
    x.set_shape([2, 5])
    refused(lambda: c.infer("simple", [x], headers=headers()), 400, "binary_data_size")
    # Bytes missing from the body.
    x = httpclient.InferInput("F", [2], "FP32")
    x.set_data_from_numpy(np.zeros(2, dtype=np.float32))
    x._raw_data = x._raw_data[:4]
    refused(lambda: c.infer("simple", [x], headers=headers()), 400, "binary")
    # JSON data that does not fit the datatype.
    x = httpclient.InferInput("U", [2], "UINT8")
    x.set_data_from_numpy(np.array([1, 2], dtype=np.uint8), binary_data=False)
    x._data = [1, 300]
    refused(lambda: c.infer("simple", [x], headers=headers()), 400, "UINT8")
    refused(lambda: c.infer("no-such-model", ins, headers=headers()), 404, "does not exist")
    refused(lambda: c.infer("simple", ins), 401, "credentials")
    ok("refusals")


if __name__ == "__main__":
    main()
