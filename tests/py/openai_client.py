"""The official OpenAI Python SDK through the gateway, unmodified: what an
application developer's code does, and the exception types it catches.

Usage: openai_client.py SCENARIO   (env: GATEWAY=http://host:port, KEY,
LIMITED_KEY, BAD_KEY). Exits non-zero with a message on the first failure;
prints one `ok <check>` line per check that passed.
"""
import os
import sys

import openai

BASE = os.environ["GATEWAY"] + "/v1"
KEY = os.environ["KEY"]


def client(key=KEY, retries=0):
    return openai.OpenAI(base_url=BASE, api_key=key, max_retries=retries, timeout=20)


def expect(exc_type, fn, status, param=None, code=None, type_=None):
    try:
        fn()
    except exc_type as e:
        assert e.status_code == status, f"{exc_type.__name__}: status {e.status_code}, wanted {status}"
        body = e.body
        assert isinstance(body, dict), f"error body not an object: {body!r}"
        for k in ("message", "type", "param", "code"):
            assert k in body, f"`{k}` missing from the error: {body}"
        if param is not None:
            assert e.param == param, f"param {e.param!r}, wanted {param!r}"
        if code is not None:
            assert e.code == code, f"code {e.code!r}, wanted {code!r}"
        if type_ is not None:
            assert e.type == type_, f"type {e.type!r}, wanted {type_!r}"
        return e
    except openai.APIStatusError as e:
        raise AssertionError(f"wanted {exc_type.__name__}, got {type(e).__name__} {e.status_code}: {e.body}")
    raise AssertionError(f"wanted {exc_type.__name__}, the call succeeded")


def ok(name):
    print(f"ok {name}", flush=True)


def main_scenario():
    c = client()
    msgs = [{"role": "user", "content": "hello"}]
    r = c.chat.completions.create(model="llama", messages=msgs, max_tokens=10)
    assert r.choices[0].message.content == "Hello from the demo backend.", r
    assert r.usage.completion_tokens == 6, r.usage
    ok("chat")

    text = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(model="llama", messages=msgs, stream=True)
        if ch.choices
    )
    assert text == "Hello from the demo backend.", text
    ok("chat stream")

    r = c.completions.create(model="llama", prompt="say hi", max_tokens=5)
    assert r.choices[0].text == "Hello from the demo backend.", r
    ok("completions")

    r = c.embeddings.create(model="llama", input="hi", encoding_format="float")
    assert r.data[0].embedding == [0.25, -0.5, 1.0], r
    ok("embeddings")

    r = c.responses.create(model="llama", input="hi", max_output_tokens=16)
    assert r.output_text == "Hello from the demo backend.", r
    ok("responses")

    audio = b"RIFF" + bytes(range(256)) * 64
    r = c.audio.transcriptions.create(model="whisper", file=("talk.wav", audio, "audio/wav"))
    length, _fnv = r.text.split()
    assert int(length) > len(audio), f"the upload did not arrive whole: {r.text}"
    ok("audio transcription")

    ids = sorted(m.id for m in c.models.list())
    assert "llama" in ids and "whisper" in ids, ids
    ok("models")

    # Refusals: the SDK's own exception types, with OpenAI's fields.
    expect(openai.BadRequestError,
           lambda: c.chat.completions.create(model="llama", messages=msgs, temperature=9),
           400, param="temperature", code="out_of_range", type_="invalid_request_error")
    expect(openai.BadRequestError,
           lambda: c.chat.completions.create(model="llama", messages=[{"role": "wizard", "content": "x"}]),
           400, param="messages[0].role", code="invalid_role")
    expect(openai.BadRequestError,
           lambda: c.chat.completions.create(model="llama", messages=msgs, max_tokens=100000),
           400, param="max_tokens")
    long = [{"role": "user", "content": "a" * 8000}]
    expect(openai.BadRequestError,
           lambda: c.chat.completions.create(model="llama", messages=long, max_tokens=100),
           400, code="context_length_exceeded")
    expect(openai.BadRequestError,
           lambda: c.responses.create(model="llama", input="hi", max_output_tokens=100000),
           400, param="max_output_tokens")
    expect(openai.NotFoundError,
           lambda: c.chat.completions.create(model="no-such-model", messages=msgs),
           404, param="model", code="model_not_found", type_="not_found_error")
    expect(openai.NotFoundError,
           lambda: c.audio.transcriptions.create(model="no-such-model", file=("a.wav", audio, "audio/wav")),
           404, param="model", code="model_not_found")
    expect(openai.AuthenticationError,
           lambda: client(key=os.environ["BAD_KEY"]).chat.completions.create(model="llama", messages=msgs),
           401, type_="authentication_error")
    expect(openai.PermissionDeniedError,
           lambda: client(key=os.environ["LIMITED_KEY"]).chat.completions.create(model="whisper", messages=msgs),
           403, type_="permission_error")
    ok("refusals")


def rate_scenario():
    """A principal limit of 2 requests, then one per 2 s. Without retries the
    third call is a RateLimitError carrying Retry-After; with the SDK's
    default retries the next call waits as told and succeeds."""
    c = client(retries=0)
    msgs = [{"role": "user", "content": "hello"}]
    for _ in range(2):
        c.chat.completions.create(model="llama", messages=msgs)
    e = expect(openai.RateLimitError,
               lambda: c.chat.completions.create(model="llama", messages=msgs),
               429, type_="rate_limit_error", code="requests")
    wait = e.response.headers.get("retry-after")
    assert wait and 0 < int(wait) <= 60, e.response.headers
    ok("rate limit")
    r = client(retries=2).chat.completions.create(model="llama", messages=msgs)
    assert r.choices[0].message.content, r
    ok("retried after Retry-After")


def quota_scenario():
    """A used-up daily quota: insufficient_quota, and the SDK does not retry
    (`x-should-retry: false`)."""
    c = client(retries=2)
    msgs = [{"role": "user", "content": "hello"}]
    c.chat.completions.create(model="llama", messages=msgs)
    expect(openai.RateLimitError,
           lambda: c.chat.completions.create(model="llama", messages=msgs),
           429, type_="insufficient_quota", code="requests_per_day")
    ok("quota")


if __name__ == "__main__":
    {"main": main_scenario, "rate": rate_scenario, "quota": quota_scenario}[sys.argv[1]]()
