"""Issue 23 items 5-10 and the server abuse test: bounded bodies and prompts, disconnects of
non-streamed requests, stop strings across token boundaries, client mistakes answered 4xx, the
key compared in constant time and required on /metrics, Host checked, slow headers cut off,
request defaults, a store changed under the server."""
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import torch
import uvicorn

import moestream
from moestream.compute.generation import load_tokenizer
from moestream.serving.app import MAX_CHARS_PER_TOKEN, create_app
from moestream.serving.protocol import GuardedProtocol

from .test_server import KEY, free_port

H = {"Authorization": f"Bearer {KEY}"}


class QuickDeadline(GuardedProtocol):
    header_timeout = 1.0


def start(app):
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", http=QuickDeadline,
                                        limit_concurrency=512))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    return srv, t, port


@pytest.fixture(scope="module")
def store(checkpoints, tmp_path_factory):
    return moestream.convert(checkpoints["mixtral"], tmp_path_factory.mktemp("harden") / "s", progress=False)


@pytest.fixture(scope="module")
def served(store):
    """A server whose decode steps take >= 20 ms (so that a request outlives its client), with a
    chat template that refuses a message saying "refuse"."""
    model = moestream.load_model(store, device_budget=3 * 36864, host_budget=0)
    real = model.decode_batch

    def slow(*a, **k):
        time.sleep(0.02)
        return real(*a, **k)
    model.decode_batch = slow

    def template(messages):
        if any(m["content"] == "refuse" for m in messages):
            raise ValueError("this template takes no 'refuse'")
        return "".join(m["content"] for m in messages)
    app = create_app(model, load_tokenizer(model), model_name="tiny", max_batch=8, max_queue=64, max_tokens_cap=200,
                     api_key=KEY, chat_template=template, max_body_bytes=1 << 20)
    srv, t, port = start(app)
    yield f"http://127.0.0.1:{port}", app, model, port
    srv.should_exit = True
    t.join(timeout=10)
    model.store.close()


def post(base, body, **kw):
    return httpx.post(base + "/v1/completions", json=body, headers={**H, **kw.pop("headers", {})}, timeout=30, **kw)


def test_oversized_bodies_and_prompts_are_refused_before_the_work(served):
    base, app, model, _ = served
    t0 = time.perf_counter()
    r = httpx.post(base + "/v1/completions", content=b"x" * (2 << 20), headers={**H, "Content-Type": "application/json"})
    assert r.status_code == 413 and "at most 1048576" in r.json()["error"]["message"]
    huge = "a" * (model.cfg.max_position_embeddings * MAX_CHARS_PER_TOKEN + 1)
    r = post(base, {"prompt": huge, "max_tokens": 1})
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"]
    assert time.perf_counter() - t0 < 10

    def chunks():
        yield b'{"prompt": "hi"}'
    r = httpx.post(base + "/v1/completions", content=chunks(), headers={**H, "Content-Type": "application/json"})
    assert r.status_code == 411


def test_a_non_streamed_request_stops_when_its_client_goes(served):
    base, app, _, _ = served
    sched = app.state.scheduler
    before = sched.tokens_generated
    with pytest.raises(httpx.TimeoutException):
        httpx.post(base + "/v1/completions", json={"prompt": "gone", "max_tokens": 150, "temperature": 0},
                   headers=H, timeout=0.5)
    deadline = time.time() + 10
    while (sched.active or sched.queued) and time.time() < deadline:
        time.sleep(0.05)
    made = sched.tokens_generated - before
    assert not sched.active and made < 100, made      # 150 at 20 ms a step would take 3 s


def test_stop_strings_spanning_token_boundaries_leave_nothing_behind(served):
    base, _, model, _ = served
    tok = load_tokenizer(model)
    r = post(base, {"prompt": "stop here", "max_tokens": 40, "temperature": 0}).json()
    text = r["choices"][0]["text"]
    ids = tok.encode(text).ids
    pieces = [tok.decode(ids[:i]) for i in range(1, len(ids) + 1)]
    checked = 0
    for i in range(1, len(pieces) - 1):
        cut = len(pieces[i - 1])
        if 0 < cut < len(text) - 1 and text[cut - 1:cut + 1] not in text[:cut - 1]:
            stop = text[cut - 1:cut + 1]             # last char of one token, first of the next
            want = text[:cut - 1]
            for stream in (False, True):
                body = {"prompt": "stop here", "max_tokens": 40, "temperature": 0, "stop": stop, "stream": stream}
                if stream:
                    got = ""
                    with httpx.stream("POST", base + "/v1/completions", json=body, headers=H, timeout=30) as s:
                        for line in s.iter_lines():
                            if line.startswith("data: {"):
                                got += json.loads(line[6:])["choices"][0]["text"]
                else:
                    got = post(base, body).json()["choices"][0]["text"]
                assert got == want, (stop, stream, got, want)
            checked += 1
            if checked == 3:
                break
    assert checked, text
    r = post(base, {"prompt": "x", "stop": ""})
    assert r.status_code == 422 and "empty stop string" in r.json()["error"]["message"]


@pytest.mark.parametrize("body,status,needle", [
    ({"prompt": "x", "seed": 2 ** 70}, 422, "seed"),
    ({"prompt": "x", "top_p": 1e-300, "temperature": 1.0, "max_tokens": 3}, 200, None),
    ({"prompt": "x", "temperature": 1e-45, "max_tokens": 3}, 200, None),
    ({"prompt": "x \U0001F600", "max_tokens": 2}, 400, "outside the model's vocabulary"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist here"),
])
def test_client_mistakes_are_4xx_and_extremes_work(served, body, status, needle):
    base = served[0]
    r = post(base, body)
    assert r.status_code == status, r.text
    if needle:
        assert needle in r.json()["error"]["message"]


def test_a_lone_surrogate_and_a_refusing_chat_template_are_400(served):
    base = served[0]
    with httpx.Client(headers={**H, "Content-Type": "application/json"}, timeout=30) as c:
        r = c.post(base + "/v1/completions", content=b'{"prompt": "a\\ud800b", "max_tokens": 2}')
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
        r = c.post(base + "/v1/completions", content=b'{"prompt": "fine", "max_tokens": 2}')   # same connection
        assert r.status_code == 200
        r = c.post(base + "/v1/chat/completions", content=json.dumps(
            {"messages": [{"role": "user", "content": "refuse"}], "max_tokens": 2}).encode())
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


def test_keys_metrics_and_host_names(served):
    base = served[0]
    assert httpx.get(base + "/metrics").status_code == 401
    assert httpx.get(base + "/metrics", headers=H).status_code == 200
    assert httpx.get(base + "/health").status_code == 200            # no key needed to ask if it is up
    r = httpx.get(base + "/health", headers={"Host": "evil.example:8000"})
    assert r.status_code == 421 and "not served here" in r.json()["error"]["message"]
    assert httpx.get(base + "/v1/models", headers={**H, "Authorization": f"Bearer {KEY}x"}).status_code == 401


def test_without_max_tokens_a_request_gets_what_fits(served):
    base, _, model, _ = served
    ctx = model.cfg.max_position_embeddings
    tok = load_tokenizer(model)
    prompt = "ab " * 70
    n = len(tok.encode(prompt).ids) + 1                       # + bos
    assert 0 < ctx - n < 200                                  # the cap (200) would not fit
    r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                         "temperature": 0}, headers=H, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= ctx - n


def test_slow_headers_are_cut_off(served):
    base, _, _, port = served
    socks = []
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")      # never the blank line
        socks.append(s)
    time.sleep(2.5)
    closed = 0
    for s in socks:
        s.settimeout(2)
        try:
            closed += s.recv(1) == b""
        except (ConnectionResetError, socket.timeout):
            closed += 0
        s.close()
    assert closed == 30
    assert httpx.get(base + "/health").json()["status"] == "ok"


def test_a_store_changed_under_the_server_makes_health_fail(store, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    model = moestream.load_model(copy, device_budget=3 * 36864, host_budget=0)
    app = create_app(model, load_tokenizer(model), model_name="tiny", max_tokens_cap=8)
    srv, t, port = start(app)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        data = copy / "experts-00000.moe"
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
        r = httpx.get(f"http://127.0.0.1:{port}/health")
        assert r.status_code == 503 and "experts-00000.moe" in r.json()["message"]
    finally:
        srv.should_exit = True
        t.join(timeout=10)
        model.store.close()


def test_serve_refuses_an_empty_key_and_an_unbindable_host(store):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "moestream.cli", "serve", str(store), *args],
                              capture_output=True, text=True, timeout=120)
    p = serve("--api-key", "")
    assert p.returncode == 2 and "--api-key is empty" in p.stderr
    p = serve("--host", "256.1.1.1", "--port", str(free_port()))
    assert p.returncode == 2 and "--host 256.1.1.1" in p.stderr and "serving" not in p.stderr, p.stderr


def test_abuse_leaves_the_server_healthy(served):
    """Bounded in count and time, loopback only: oversized bodies, 1M-character prompts,
    slow-header sockets, disconnected non-streamed requests, bad unicode; afterwards /health is
    ok, no slot is leaked and RSS is back within 10 % of its baseline."""
    base, app, _, port = served
    proc = psutil.Process()

    def abuse(i):
        kind = i % 5
        try:
            if kind == 0:
                return httpx.post(base + "/v1/completions", content=b"y" * (3 << 20),
                                  headers={**H, "Content-Type": "application/json"}, timeout=30).status_code
            if kind == 1:
                return post(base, {"prompt": "z" * 1_000_000, "max_tokens": 1}).status_code
            if kind == 2:
                with socket.create_connection(("127.0.0.1", port)) as s:
                    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
                    s.settimeout(5)
                    return "closed" if s.recv(1) == b"" else "answered"
            if kind == 3:
                httpx.post(base + "/v1/completions", json={"prompt": f"bye {i}", "max_tokens": 100}, headers=H,
                           timeout=0.3)
                return "finished"
            return httpx.post(base + "/v1/completions", content=b'{"prompt": "\\udfff\\ud800", "max_tokens": 2}',
                              headers={**H, "Content-Type": "application/json"}, timeout=30).status_code
        except httpx.TimeoutException:
            return "timeout"
    with ThreadPoolExecutor(10) as ex:
        list(ex.map(abuse, range(20)))               # warm: pools, buffers, the allocator
        baseline = proc.memory_info().rss
        t0 = time.perf_counter()
        got = list(ex.map(abuse, range(100)))
    assert time.perf_counter() - t0 < 120
    assert {got[i] for i in range(0, 100, 5)} == {413} and {got[i] for i in range(1, 100, 5)} == {400}
    assert {got[i] for i in range(2, 100, 5)} == {"closed"} and {got[i] for i in range(4, 100, 5)} == {400}
    sched = app.state.scheduler
    deadline = time.time() + 20
    while (sched.active or sched.queued) and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(base + "/health").json() == {"status": "ok", "active": 0, "queued": 0}
    assert proc.memory_info().rss < baseline * 1.10


def test_metrics_in_prometheus_text_a_log_line_per_request_and_clamped_max_tokens(store):
    """Issue 26 item 5: /metrics in Prometheus' text format (JSON at /metrics.json and for
    Accept: application/json), one access-log line per request, max_tokens beyond what fits clamped."""
    model = moestream.load_model(store, device_budget=3 * 36864, host_budget=0)
    lines = []
    app = create_app(model, load_tokenizer(model), model_name="tiny", max_tokens_cap=10_000, access_log=lines.append)
    srv, t, port = start(app)
    base = f"http://127.0.0.1:{port}"
    try:
        r = httpx.post(base + "/v1/completions", json={"prompt": "ab " * 70, "max_tokens": 5000, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200, r.text
        n = r.json()["usage"]["prompt_tokens"]
        assert n + r.json()["usage"]["completion_tokens"] <= model.cfg.max_position_embeddings
        text = httpx.get(base + "/metrics").text
        assert "# TYPE moestream_tokens_generated_total counter" in text
        assert any(line.startswith("moestream_store_hits_l1 ") for line in text.splitlines())
        assert httpx.get(base + "/metrics", headers={"Accept": "application/json"}).json()["tokens_generated"] > 0
        assert httpx.get(base + "/metrics.json").json()["tokens_generated"] > 0
        assert httpx.post(base + "/v1/completions", json={"prompt": "x", "bogus": 1}).status_code == 422
        httpx.get(base + "/health")
        deadline = time.time() + 5
        while len(lines) < 5 and time.time() < deadline:
            time.sleep(0.05)
        assert lines[0].startswith("POST /v1/completions 200 prompt ") and " tokens " in lines[0] and lines[0].endswith(" ms")
        assert lines[1].startswith("GET /metrics 200") and lines[4].startswith("POST /v1/completions 422")
        assert not any("/health" in line for line in lines)
    finally:
        srv.should_exit = True
        t.join(timeout=10)
        model.store.close()
