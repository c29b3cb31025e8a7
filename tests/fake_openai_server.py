"""A real OpenAI-compatible server on loopback, for the judge's and the generator's tests and benchmark.

`FakeOpenAIServer` runs a stdlib `ThreadingHTTPServer` (HTTP/1.1 keep-alive, one thread per
connection) on 127.0.0.1 with an ephemeral port, in a background thread. It answers
`POST /v1/chat/completions` like a judge model that reads our pairwise prompt
(`online.judge_prompt`): the ground truth prefers the reply containing `marker` ("A" or "B";
"tie" when both or neither contain it). Every answer carries `usage` (prompt_tokens = words in
the messages, completion_tokens = 1). It also answers `POST /v1/completions` like a policy
server (the generator's `openai` backend): `n` texts `"<prompt> #<j>"`, under the same faults.

Scriptable behaviour, applied per request:
- `mode`: "rule" (the ground truth), "always_a" (position bias: disagrees across orders),
  "garbage" (an unparseable sentence), "shorter" (prefers the shorter reply: labels free text,
  e.g. a real model's samples, which carry no marker);
- `script(*faults)`: the next requests, in arrival order, get these faults;
- `storm={fault: probability}`: with no scripted fault left, each request draws one (seeded);
- faults: "400", "429" and "503" (both with `Retry-After: retry_after`, delta-seconds or an
  HTTP-date), "500", "timeout" (sleeps `timeout_sleep_s`
  before answering), "drop" (closes the connection without a reply), "garbage",
  "always_a", "malformed" (a 200 whose body is an HTML page), "no_choices" (a 200 with
  `"choices": []`), "truncated" (a 200 `application/json` body cut mid-object),
  "wrong_object" (a 200 models listing, `"object": "list"`), "missing_choices" (a 200 error
  object without `choices`, as some proxies send), "no_usage" (a good chat reply without
  `usage`), "html_502" (a load balancer's HTML 502 page);
- `latency_s`: fixed delay before every answer;
- `api_key`: when set, requests without `Authorization: Bearer <api_key>` get 401.

Every request is logged (`requests`: arrival time, body key, fault, status, whether the
Authorization header matched, the ground truth, and the parsed JSON body itself) for assertions. Run as a script
(`python tests/fake_openai_server.py --latency-ms 50`) it prints `READY <base_url>` and serves
until killed; the benchmark uses it that way so client and server do not share a GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("400", "429", "500", "503", "timeout", "drop", "garbage", "always_a", "malformed", "no_choices",
          "truncated", "wrong_object", "missing_choices", "no_usage", "html_502")
GARBAGE = "Both replies have their merits, and it is hard to say."
_REPLY_A = re.compile(r"<reply_a>\n(.*?)\n</reply_a>", re.S)
_REPLY_B = re.compile(r"<reply_b>\n(.*?)\n</reply_b>", re.S)


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it."""

    t: float  # time.monotonic() when the body had been read
    key: str  # hash of the messages: the same logical call (e.g. its retries) has the same key
    fault: str | None
    status: int  # 0 when the connection was dropped
    auth_ok: bool
    truth: str | None  # "A" | "B" | "tie" by the marker rule; None when unreadable
    body: dict | None = None  # the request's JSON body as received (None when it was not JSON)


class FakeOpenAIServer:
    """See module docstring. Use as a context manager or call `start()` / `stop()`."""

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        api_key: str | None = None,
        marker: str = "GOOD",
        mode: str = "rule",
        retry_after: str = "1",
        timeout_sleep_s: float = 1.0,
        storm: dict[str, float] | None = None,
        seed: int = 0,
        model: str = "fake-judge",
    ) -> None:
        assert mode in ("rule", "always_a", "garbage", "shorter"), mode
        assert all(f in FAULTS for f in (storm or {})), storm
        self.latency_s = latency_s
        self.api_key = api_key
        self.marker = marker
        self.mode = mode
        self.retry_after = retry_after
        self.timeout_sleep_s = timeout_sleep_s
        self.storm = dict(storm or {})
        self.model = model
        self.requests: list[RequestRecord] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._queue: deque[str] = deque()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    # -- scripting and inspection ---------------------------------------------------------------

    def script(self, *faults: str) -> None:
        """Give the next `len(faults)` requests these faults, in arrival order."""
        assert all(f in FAULTS for f in faults), faults
        with self._lock:
            self._queue.extend(faults)

    @property
    def n_requests(self) -> int:
        with self._lock:
            return len(self.requests)

    def truth_for(self, response_a: str, response_b: str) -> str:
        """The ground-truth verdict for a reply pair shown as (A, B)."""
        if self.mode == "shorter":
            la, lb = len(response_a.strip()), len(response_b.strip())
            return "A" if la < lb else "B" if lb < la else "tie"
        a, b = self.marker in response_a, self.marker in response_b
        return "A" if a and not b else "B" if b and not a else "tie"

    # -- request handling (server threads) --------------------------------------------------

    def _handle(self, h: _Handler, raw: bytes) -> None:
        t = time.monotonic()
        auth_ok = self._auth_ok(h)
        try:
            body = json.loads(raw)
            messages = body["messages"]
            user = next(m["content"] for m in messages if m["role"] == "user")
            key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
            ma, mb = _REPLY_A.search(user), _REPLY_B.search(user)
            truth = self.truth_for(ma.group(1), mb.group(1)) if ma and mb else None
            n_words = sum(len(m["content"].split()) for m in messages)
        except (ValueError, KeyError, TypeError, StopIteration):
            self._log(RequestRecord(t, "", None, 400, auth_ok, None))
            return h.reply(400, {"error": {"message": "bad request"}})
        fault = self._fault(h, RequestRecord(t, key, None, 0, auth_ok, truth, body), "chat.completion")
        if fault == "answered":
            return
        behaviour = fault if fault in ("garbage", "always_a") else self.mode
        text = {"garbage": GARBAGE, "always_a": "A"}.get(behaviour, truth or "tie")
        reply = completion(key, body.get("model", self.model), text, n_words)
        if fault == "no_usage":
            del reply["usage"]
        else:
            with self._lock:
                self.prompt_tokens += n_words
                self.completion_tokens += 1
        h.reply(200, reply)

    def _handle_completions(self, h: _Handler, raw: bytes) -> None:
        t = time.monotonic()
        auth_ok = self._auth_ok(h)
        try:
            body = json.loads(raw)
            prompt, n = body["prompt"], int(body.get("n", 1))
            key = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        except (ValueError, KeyError, TypeError, AttributeError):
            self._log(RequestRecord(t, "", None, 400, auth_ok, None))
            return h.reply(400, {"error": {"message": "bad request"}})
        if self._fault(h, RequestRecord(t, key, None, 0, auth_ok, None, body), "text_completion") == "answered":
            return
        choices = [{"index": j, "text": f"{prompt} #{j}", "finish_reason": "stop"} for j in range(n)]
        h.reply(200, {"id": f"cmpl-{key}", "object": "text_completion", "model": body.get("model", self.model),
                      "choices": choices})

    def _auth_ok(self, h: _Handler) -> bool:
        return self.api_key is None or h.headers.get("Authorization") == f"Bearer {self.api_key}"

    def _fault(self, h: _Handler, rec: RequestRecord, kind: str) -> str | None:
        """Log the request and apply its fault: "answered" when that already replied, else the fault.

        `kind` is the `object` a good reply of this endpoint carries.
        """
        if not rec.auth_ok:
            self._log(dataclasses.replace(rec, status=401))
            h.reply(401, {"error": {"message": "invalid api key"}})
            return "answered"
        with self._lock:
            if self._queue:
                fault: str | None = self._queue.popleft()
            else:
                fault = self._draw_storm()
        if self.latency_s:
            time.sleep(self.latency_s)
        status = {"400": 400, "429": 429, "500": 500, "503": 503, "drop": 0, "html_502": 502}.get(fault or "", 200)
        self._log(dataclasses.replace(rec, fault=fault, status=status))
        if fault in ("429", "503"):
            message = "rate limited" if fault == "429" else "overloaded"
            h.reply(status, {"error": {"message": message}}, {"Retry-After": self.retry_after})
        elif fault in ("400", "500"):
            h.reply(status, {"error": {"message": f"scripted {fault}"}})
        elif fault == "drop":
            h.drop()
        elif fault == "malformed":
            h.reply_raw(200, b"<html>upstream hiccup</html>", "text/html")
        elif fault == "no_choices":
            h.reply(200, {"object": kind, "choices": []})
        elif fault == "truncated":
            h.reply_raw(200, b'{"id": "cmpl-1", "object": "' + kind.encode() + b'", "choi', "application/json")
        elif fault == "wrong_object":
            h.reply(200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
        elif fault == "missing_choices":
            h.reply(200, {"object": kind, "error": {"message": "upstream model overloaded"}})
        elif fault == "html_502":
            h.reply_raw(502, b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>", "text/html")
        else:
            if fault == "timeout":
                time.sleep(self.timeout_sleep_s)
            return fault
        return "answered"

    def _draw_storm(self) -> str | None:
        x = self._rng.random()
        for fault, p in self.storm.items():
            if x < p:
                return fault
            x -= p
        return None

    def _log(self, rec: RequestRecord) -> None:
        with self._lock:
            self.requests.append(rec)


def completion(key: str, model: str, text: str, prompt_tokens: int) -> dict:
    """A chat completion body as OpenAI-compatible servers send it."""
    return {
        "id": f"chatcmpl-{key}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
    }


async def serve_asyncio(latency_s: float, marker: str = "GOOD", ready=print) -> None:
    """The judge model on one asyncio loop: rule mode and a fixed latency only (no faults).

    For the throughput benchmark. The threaded server above spends ~0.6 ms of Python per
    request and its 16+ handler threads fight over one GIL on a 2-core machine; that showed as
    missing throughput although the client was idle. Production servers (`vllm serve`:
    uvicorn on one event loop) answer like this one: the latency is awaited, not slept in a
    thread, and parsing costs tens of microseconds.
    """
    judge = FakeOpenAIServer(marker=marker)

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                raw = await reader.readexactly(length)
                await answer(raw, writer)  # HTTP/1.1 without pipelining: one request at a time
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def answer(raw: bytes, writer: asyncio.StreamWriter) -> None:
        body = json.loads(raw)
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        ma, mb = _REPLY_A.search(user), _REPLY_B.search(user)
        truth = judge.truth_for(ma.group(1), mb.group(1)) if ma and mb else "tie"
        n_words = sum(len(m["content"].split()) for m in body["messages"])
        await asyncio.sleep(latency_s)
        data = json.dumps(completion("bench", body.get("model", "fake-judge"), truth, n_words)).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)

    server = await asyncio.start_server(connection, "127.0.0.1", 0, backlog=256)
    host, port = server.sockets[0].getsockname()[:2]
    ready(f"READY http://{host}:{port}/v1", flush=True)
    async with server:
        await server.serve_forever()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # do not wait for handlers sleeping through a "timeout" fault
    request_queue_size = 256  # a burst of concurrent connects must not overflow the backlog
    fake: FakeOpenAIServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real APIs
    # With Nagle on, a reply split over two writes waits for the client's delayed ACK
    # (~40 ms on Linux), which would nearly double a 50 ms latency.
    disable_nagle_algorithm = True
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        route = {"/v1/chat/completions": self.server.fake._handle,
                 "/v1/completions": self.server.fake._handle_completions}.get(self.path.rstrip("/"))
        if route is None:
            return self.reply(404, {"error": {"message": f"no route {self.path}"}})
        try:
            route(self, raw)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout): nothing to answer

    def reply(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        self.reply_raw(status, json.dumps(obj).encode(), "application/json", headers)

    def reply_raw(self, status: int, data: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        # Status line, headers and body in one write (one segment, one client wake-up), as
        # production servers do for small bodies.
        lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}", f"Content-Type: {ctype}",
                 f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)

    def drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # tests read `requests`, not stderr


def spawn(latency_ms: float, *args: str) -> tuple[subprocess.Popen, str]:
    """This server as a separate process (its own GIL); returns it and its base URL."""
    proc = subprocess.Popen([sys.executable, __file__, "--latency-ms", str(latency_ms), *args],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "READY":
        proc.kill()
        raise RuntimeError(f"fake judge server did not start (said {line!r})")
    return proc, line[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--mode", choices=["rule", "always_a", "garbage", "shorter"], default="rule")
    ap.add_argument("--asyncio", action="store_true", help="one event loop, rule mode only (the benchmark's server)")
    args = ap.parse_args()
    if args.asyncio:
        if args.mode != "rule" or args.api_key:
            ap.error("--asyncio serves rule mode without an API key only")
        try:
            asyncio.run(serve_asyncio(args.latency_ms / 1000.0))
        except KeyboardInterrupt:
            pass
        return
    server = FakeOpenAIServer(latency_s=args.latency_ms / 1000.0, api_key=args.api_key, mode=args.mode).start()
    print(f"READY {server.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
