"""Text generation on the device (issue 26, section 5): a real agent serving the tiny generative
bundle (tests/llmkit.py) answers the official `openai` client, raw SSE streams, the v2 generate
extension and tritonclient; refusals (over-long prompt, bad messages, lone surrogate, full queue)
get their documented answer; a client that leaves mid-stream stops its generation. The agent runs
with [llm] max_queue 1 and a 20 ms diagnostic pause per token (token_delay_ms) so that a long
generation is in flight for seconds, not milliseconds: every wait is on a condition."""
from __future__ import annotations

import json
import re
import socket
import time
import urllib.request

import pytest

from agents import AgentProc, wait_until

NAME = "tiny-llm"
PROMPT = "The function returns"  # the tiny decoder's greedy text after it runs to its context, no end of text


# ---- in-process: request parsing, stop sequences, SSE framing (fast tier) ----

def test_requests_are_checked_field_by_field():
    from device_agent.llm_request import parse_chat, parse_completion, parse_generate
    from edgebundle.errors import InputError

    ok = parse_chat(json.dumps({"model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                "max_completion_tokens": 5, "stop": "x", "logprobs": True, "top_logprobs": 2,
                                "stream": True, "stream_options": {"include_usage": True}}).encode())
    assert ok.messages == [{"role": "user", "content": "hi"}] and ok.max_tokens == 5 and ok.stop == ("x",)
    assert ok.sampling()["top_logprobs"] == 2 and ok.include_usage
    assert parse_completion(b'{"prompt": [[5, 6, 7]], "logprobs": 0}').prompt == [5, 6, 7]
    gen = parse_generate(b'{"text_input": "a", "max_tokens": 3, "parameters": {"temperature": 0, "stop_words": ["b"]}}')
    assert (gen.max_tokens, gen.temperature, gen.stop) == (3, 0.0, ("b",))
    bad = {b'[1]': "JSON object", b'{"messages": "hi"}': "non-empty list",
           b'{"messages": [{"content": "hi"}]}': "messages[0].role",
           b'{"messages": [{"role": "user", "content": 5}]}': "messages[0].content must be a string",
           b'{"messages": [{"role": "user", "content": "\\udcff"}]}': "lone surrogate",
           b'{"messages": [{"role": "user", "content": "a"}], "n": 2}': "n must be 1",
           b'{"messages": [{"role": "user", "content": "a"}], "temperature": 2.5}': "temperature",
           b'{"messages": [{"role": "user", "content": "a"}], "frequency_penalty": 1}': "not supported",
           b'{"messages": [{"role": "user", "content": "a"}], "seed": 4294967296}': "seed"}
    for body, why in bad.items():
        with pytest.raises(InputError, match=re.escape(why)):
            parse_chat(body)
    with pytest.raises(InputError, match="unknown generate parameter"):
        parse_generate(b'{"text_input": "a", "parameters": {"max_tokenz": 3}}')


def test_stop_sequences_hold_back_only_what_could_become_one():
    from device_agent.generative import StopText
    from device_agent.openai_api import DONE, sse

    s = StopText(("END", "\n\n"))
    assert s.feed("abc E") == ("abc ", False)  # "E" may start END
    assert s.feed("N") == ("", False)
    assert s.feed("Dx") == ("", True)  # END met: neither it nor what follows goes out
    s = StopText(("END",))
    assert s.feed("EN") == ("", False) and s.feed("o") == ("ENo", False) and s.flush() == ""
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode() and DONE == b"data: [DONE]\n\n"


@pytest.mark.fuzz
def test_fuzz_generation_requests_are_refused_never_crash():
    """Mutated valid bodies of each endpoint: a GenRequest or an InputError (a 400), nothing else."""
    from hypothesis import given
    from hypothesis import strategies as st

    from device_agent.llm_request import parse_chat, parse_completion, parse_generate
    from edgebundle.errors import InputError
    from fuzzing import FUZZ, TRIED, mutate, report

    name = "generation request: mutated valid request"
    valid = ((parse_chat, {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                           "temperature": 0.5, "top_p": 0.9, "stop": ["x"], "stream": True, "logprobs": True,
                           "top_logprobs": 1, "stream_options": {"include_usage": True}, "n": 1, "seed": 3}),
             (parse_completion, {"prompt": "hi", "max_tokens": 4, "logprobs": 1, "stop": "x", "top_k": 5}),
             (parse_generate, {"text_input": "hi", "parameters": {"max_tokens": 4, "temperature": 0,
                                                                  "stop_words": ["x"], "stream": True}}))

    @FUZZ
    @given(which=st.integers(0, 2), data=st.data())
    def run(which, data):
        parse, doc = valid[which]
        TRIED[name] += 1
        try:
            parse(json.dumps(mutate(doc, data)).encode())
        except InputError as e:
            assert str(e)

    run()
    report(name)


# ---- a real agent ----

@pytest.fixture(scope="module")
def agent(llm_bundles, keys, tmp_path_factory):
    a = AgentProc(tmp_path_factory.mktemp("llm") / "data", bundle=llm_bundles["v1"], interval=60,
                  extra=("--log-format", "text", "--trusted-key", str(keys / "a.pub"), "--llm-max-queue", "1"),
                  env={"EDGEPACK_AGENT_LLM_TOKEN_DELAY_MS": "20"}).start()
    yield a
    assert a.stop() == 0


def _post(agent, path: str, body) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = urllib.request.Request(agent.base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(r, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _metrics(agent) -> dict[str, float]:
    with urllib.request.urlopen(agent.base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {k: float(v) for k, v in re.findall(r"^(edgepack_generation_\S+) (\S+)$", text, re.M)}


def _gauge(agent, name: str) -> float:
    return _metrics(agent).get(f'edgepack_generation_{name}{{model="{NAME}"}}', -1.0)


class RawStream:
    """A streaming request on a plain socket, read the way `curl -N` shows it: status line, headers,
    then HTTP/1.1 chunks, each holding one or more SSE events."""

    def __init__(self, agent, path: str, body: dict):
        self.sock = socket.create_connection(("127.0.0.1", agent.port), timeout=30)
        data = json.dumps(body).encode()
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        self.buf = b""
        head = self._until(b"\r\n\r\n").decode()
        self.status = int(head.split()[1])
        self.headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in head.split("\r\n")[1:] if ln)}

    def _until(self, mark: bytes) -> bytes:
        while mark not in self.buf:
            more = self.sock.recv(65536)
            if not more:
                raise EOFError(f"connection closed before {mark!r}")
            self.buf += more
        out, self.buf = self.buf.split(mark, 1)
        return out

    def chunk(self) -> bytes:
        size = int(self._until(b"\r\n"), 16)
        while len(self.buf) < size + 2:
            self.buf += self.sock.recv(65536)
        out, self.buf = self.buf[:size], self.buf[size + 2:]
        return out

    def events(self):
        """Each `data:` payload until the final empty chunk."""
        while (c := self.chunk()):
            for ev in c.decode().split("\n\n"):
                if ev:
                    assert ev.startswith("data: "), ev
                    yield ev[len("data: "):]

    def close(self) -> None:
        self.sock.close()


@pytest.mark.agent
def test_raw_sse_stream_and_keepalive(agent):
    s = RawStream(agent, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "Hello"}],
                                                  "max_tokens": 6, "temperature": 0, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert s.status == 200 and s.headers["content-type"].startswith("text/event-stream")
    assert s.headers["transfer-encoding"] == "chunked"
    events = list(s.events())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == NAME for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    # the connection stays open for the next request (chunked framing ended the stream)
    s.sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in s._until(b"\r\n\r\n")
    s.close()


@pytest.mark.agent
def test_openai_client_chat_stream_and_completions(agent, llm_bundles):
    from openai import OpenAI

    from device_agent import load_bundle

    client = OpenAI(base_url=agent.base + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [NAME]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does it return?"}]
    chat = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 12
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=12, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == chat.choices[0].message.content  # greedy: the stream says the same
    comp = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == comp.usage.completion_tokens == 16 and len(lp.top_logprobs[0]) == 2
    assert "".join(lp.tokens) == comp.choices[0].text and lp.text_offset[0] == 0
    # the same greedy text as the in-process API on the same bundle
    local = load_bundle(llm_bundles["v1"]).generation
    assert local.complete(PROMPT, max_tokens=16, temperature=0).text == comp.choices[0].text
    assert local.chat(msgs, max_tokens=12, temperature=0).text == chat.choices[0].message.content
    # a stop sequence is cut from the text
    stop = comp.choices[0].text[5:8]
    cut = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == comp.choices[0].text[:comp.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable


@pytest.mark.agent
def test_v2_generate_extension_and_tensor_endpoints(agent, llm_bundles):
    import numpy as np
    import tritonclient.http as httpclient

    code, _, whole = _post(agent, f"/v2/models/{NAME}/generate",
                           {"text_input": PROMPT, "parameters": {"max_tokens": 8, "temperature": 0}})
    assert code == 200 and whole["model_name"] == NAME and whole["model_version"] == "1.0.0"
    s = RawStream(agent, f"/v2/models/{NAME}/generate_stream", {"text_input": PROMPT, "max_tokens": 8,
                                                                 "temperature": 0})
    events = [json.loads(e) for e in s.events()]
    s.close()
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    assert events[-1]["finish_reason"] == "length"
    code, _, err = _post(agent, f"/v2/models/{NAME}/generate", {"text_input": 3})
    assert code == 400 and "text_input" in err["error"]
    # the KServe tensor side of the same model: metadata, readiness, teacher-forced logits
    tc = httpclient.InferenceServerClient(f"127.0.0.1:{agent.port}")
    assert tc.is_model_ready(NAME) and tc.get_model_metadata(NAME)["platform"] == "genai_onnxruntime-genai"
    x = httpclient.InferInput("input_ids", [1, 4], "INT64")
    x.set_data_from_numpy(np.asarray([[334, 416, 387, 85]], np.int64))
    assert tc.infer(NAME, [x]).as_numpy("logits").shape == (1, 4, 512)


@pytest.mark.agent
def test_refusals_name_the_problem(agent):
    from openai import BadRequestError, NotFoundError, OpenAI

    client = OpenAI(base_url=agent.base + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(BadRequestError, match=r"prompt \(250 tokens\) \+ max_tokens \(10\) = 260 tokens.*context of 256"):
        client.completions.create(model=NAME, prompt=[5] * 250, max_tokens=10)
    with pytest.raises(NotFoundError, match="not found"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    for body, why in ((b'{"messages": {"role": "user"}}', "non-empty list"),
                      (b'{"messages": [{"role": "user"}]}', "messages[0].content"),
                      (b'{"messages": [{"role": 7, "content": "hi"}]}', "messages[0].role"),
                      (b'{"messages": [{"role": "user", "content": "\\udcff"}]}', "lone surrogate"),
                      (b'{"messages": [{"role": "user", "content": "a"}], "n": 3}', "n must be 1")):
        code, _, err = _post(agent, "/v1/chat/completions", body)
        assert code == 400 and why in err["error"]["message"], err
    for path, body in (("/v1/completions", b'{"prompt": "a\\udcffb"}'),
                       (f"/v2/models/{NAME}/generate", b'{"text_input": "\\udcff"}')):
        code, _, err = _post(agent, path, body)
        assert code == 400 and "lone surrogate" in json.dumps(err), err
    code, _, _ = _post(agent, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert code == 200  # still serving


@pytest.mark.agent
def test_full_queue_503_and_disconnect_stops_the_generation(agent):
    long = {"model": NAME, "prompt": PROMPT, "max_tokens": 240, "temperature": 0, "stream": True}
    before = _metrics(agent)
    a = RawStream(agent, "/v1/completions", long)  # 240 tokens x 20 ms: seconds in flight
    next(a.events())
    wait_until(lambda: _gauge(agent, "in_flight") == 1, 10, what="generation A running")
    b = RawStream(agent, "/v1/completions", long)  # status and headers go out at once; it waits its turn
    assert b.status == 200
    wait_until(lambda: _gauge(agent, "queue_depth") == 1, 10, what="generation B waiting")
    assert _gauge(agent, "kv_cache_bytes") > 0
    code, headers, err = _post(agent, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
    assert code == 503 and headers["Retry-After"] == "1" and "busy" in err["error"]["message"]
    assert _gauge(agent, "in_flight") == 1  # A still runs: the refusal is the queue's, not a finished A
    a.close()  # A's client leaves mid-stream: A stops, B takes its turn
    t0 = time.monotonic()
    wait_until(lambda: _gauge(agent, "queue_depth") == 0, 5, interval=0.02, what="A stopped, B started")
    assert time.monotonic() - t0 < 1.0
    b.close()
    wait_until(lambda: _gauge(agent, "in_flight") == 0, 5, interval=0.02, what="B stopped")
    after = _metrics(agent)
    key = f'edgepack_generation_requests_total{{model="{NAME}",version="1.0.0",outcome="%s"}}'
    assert after[key % "cancelled"] - before.get(key % "cancelled", 0) == 2
    assert after[key % "queue_full"] - before.get(key % "queue_full", 0) == 1
    assert _gauge(agent, "kv_cache_bytes") == 0
    code, _, ok = _post(agent, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert code == 200 and ok["usage"]["completion_tokens"] == 3  # the agent keeps serving
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(agent.base + "/metrics", timeout=5) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    ttft = families["edgepack_generation_time_to_first_token_seconds"]
    assert ttft.type == "histogram" and any(x.name.endswith("_count") and x.value > 0 for x in ttft.samples)
    with urllib.request.urlopen(agent.base + "/stats", timeout=5) as r:
        gen = json.loads(r.read())["window"]["generation"]
    assert gen["cancelled"] >= 2 and gen["queue_full"] >= 1 and gen["ttft_ms"]["p95"] > 0
    assert gen["decode_tokens_per_s"] > 0 and gen["queue_depth_max"] >= 1
