"""Does a served OpenAI-compatible endpoint really answer? GET /health, GET /v1/models (the served name
is listed), POST /v1/chat/completions, each retried with backoff until a deadline (a server still
loading refuses connections or answers 503), timed, and printed with the curl line that repeats it.
`load_test` sends N chat requests C at a time and reports throughput and p50/p95 latency.

Stdlib only (urllib + threads): it runs on login nodes without torch, requests or vLLM.
"""
from __future__ import annotations

import http.client
import json
import math
import shlex
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

DEFAULT_PROMPT = "Say hello in one short sentence."
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}   # the server is starting or busy: try again
MAX_REPLY_BYTES = 16 << 20                             # a reply longer than this is not an OpenAI answer


@dataclass
class Endpoint:
    url: str                      # http://host:port, no trailing /v1
    model: str = ""               # served name expected in /v1/models; "" = take the first listed
    api_key: str = ""             # sent as a bearer token; shown as $VLLM_API_KEY, never printed


@dataclass
class Check:
    name: str                     # "GET /health"
    ok: bool
    latency_s: float              # of the last attempt
    attempts: int
    detail: str                   # what was seen, or why it failed
    curl: str                     # the same request by hand
    answer: str = ""
    reasoning: str = ""           # the <think> part, shown apart from the answer
    model: str = ""               # the served name asked, when the endpoint serves several (LoRA adapters)


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    ok: int
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.ok == self.requests

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the successful requests' latencies (0.0 when none succeeded)."""
        if not self.latencies_s:
            return 0.0
        ordered = sorted(self.latencies_s)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    def as_dict(self) -> dict:
        return {"requests": self.requests, "concurrency": self.concurrency, "ok": self.ok,
                "failed": self.requests - self.ok, "wall_s": round(self.wall_s, 4),
                "requests_per_s": round(self.requests_per_s, 3), "tokens_per_s": round(self.tokens_per_s, 2),
                "p50_s": round(self.percentile(50), 4), "p95_s": round(self.percentile(95), 4),
                "errors": self.errors[:5]}


class HttpError(Exception):
    """A request that did not succeed; `retry` says whether waiting can help."""

    def __init__(self, message: str, *, retry: bool, timed_out: bool = False):
        super().__init__(message)
        self.retry, self.timed_out = retry, timed_out


class _Deadline:
    """Shuts every socket of one request at a wall-clock deadline. A socket timeout alone bounds each read,
    not the whole reply: a server sending a byte just inside it keeps a request alive for ever."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._passed = False
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    @property
    def cut(self) -> bool:
        """Whether the deadline shut this request's sockets."""
        return self._passed

    def remaining(self) -> float:
        return max(self.at - time.monotonic(), 0.001)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
        if time.monotonic() >= self.at:
            self._cut()

    def _cut(self) -> None:
        with self._lock:
            self._passed = True
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)     # wakes a blocked read; the owner closes the socket
                except OSError:
                    pass


def _deadline_opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib (proxies, redirects as usual) whose connections connect within the time left and hand their
    socket to the deadline."""

    def connection(base: type[http.client.HTTPConnection]):
        def make(host: str, **kwargs) -> http.client.HTTPConnection:
            conn = base(host, **kwargs)
            connect = conn.connect

            def bounded_connect() -> None:
                conn.timeout = deadline.remaining()
                connect()
                deadline.watch(conn.sock)
            conn.connect = bounded_connect   # type: ignore[method-assign]
            return conn
        return make

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(connection(http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(connection(http.client.HTTPSConnection), req, context=self._context)

    return urllib.request.build_opener(Http(), Https())


def request(endpoint: Endpoint, method: str, path: str, body: dict | None = None, *,
            timeout: float) -> tuple[object, float]:
    """One HTTP call, answered or abandoned within `timeout` seconds of wall-clock time whatever the server
    does; returns (parsed JSON or text, seconds). Raises HttpError."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(endpoint.url.rstrip("/") + path, data=data, method=method, headers=headers)
    start = time.monotonic()
    with _Deadline(timeout) as deadline:
        try:
            with _deadline_opener(deadline).open(req, timeout=deadline.remaining()) as reply:
                raw = reply.read(MAX_REPLY_BYTES + 1)
        except urllib.error.HTTPError as error:
            text = _error_text(error)
            hint = " (set VLLM_API_KEY or --api-key-file to the deploy's key)" if error.code in (401, 403) else ""
            raise HttpError(f"HTTP {error.code}{hint}: {text}", retry=error.code in _RETRY_STATUS) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            raise _failure(endpoint, error, deadline, timeout) from None
    if len(raw) > MAX_REPLY_BYTES:
        raise HttpError(f"the reply from {endpoint.url} is longer than {MAX_REPLY_BYTES >> 20} MiB", retry=False)
    latency = time.monotonic() - start
    text = raw.decode(errors="replace")
    try:
        return (json.loads(text) if text.strip() else ""), latency
    except (ValueError, RecursionError):
        return text, latency


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        return error.read(300).decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return "(the body could not be read)"


def _failure(endpoint: Endpoint, error: Exception, deadline: _Deadline, timeout: float) -> HttpError:
    """Why a request got no usable answer, and whether trying again can help."""
    reason = getattr(error, "reason", error)
    if deadline.cut or isinstance(reason, TimeoutError):
        return HttpError(f"no complete answer from {endpoint.url} within the time left ({timeout:.2g} s)",
                         retry=True, timed_out=True)
    if isinstance(error, http.client.HTTPException) and not isinstance(error, ConnectionError):
        return HttpError(f"{endpoint.url} did not answer in HTTP ({type(error).__name__}: "
                         f"{str(error)[:200]!r}); is this the endpoint's port?", retry=False)
    return HttpError(f"no answer from {endpoint.url}: {reason}", retry=True)


def curl_line(endpoint: Endpoint, method: str, path: str, body: dict | None = None) -> str:
    """The request as a curl command; the key appears as "$VLLM_API_KEY", never its value."""
    parts = ["curl", "-sS"] + (["-X", method] if method != "GET" else []) + [shlex.quote(endpoint.url.rstrip("/") + path)]
    if body is not None:
        parts += ["-H", shlex.quote("Content-Type: application/json")]
    if endpoint.api_key:
        parts += ["-H", '"Authorization: Bearer $VLLM_API_KEY"']
    if body is not None:
        parts += ["-d", shlex.quote(json.dumps(body))]
    return " ".join(parts)


def chat_body(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0}


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, answer) of a chat message: vLLM's reasoning parser fills `reasoning_content` (or
    `reasoning` in newer releases); without a parser the text carries <think>...</think> itself
    (or only the closing tag when the chat template opened it in the prompt)."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    if not reasoning and "</think>" in content:
        reasoning, _, content = content.partition("</think>")
        reasoning = reasoning.split("<think>", 1)[-1]
    return reasoning.strip(), content.strip()


def served_names(reply: object) -> list[str]:
    """The model names a /v1/models reply lists (none when it has another shape)."""
    data = reply.get("data") if isinstance(reply, dict) else None
    if not isinstance(data, list):
        return []
    return [item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)]


def chat_message(reply: object) -> dict:
    """choices[0].message of a chat reply; HttpError (not retried) for any other shape."""
    try:
        message = reply["choices"][0]["message"]          # type: ignore[index]
    except (TypeError, KeyError, IndexError):
        message = None
    texts = ("content", "reasoning_content", "reasoning")
    if not isinstance(message, dict) or not all(isinstance(message.get(k), (str, type(None))) for k in texts):
        raise HttpError(f"no choices[0].message with text content in the reply: {str(reply)[:200]}", retry=False)
    return message


def completion_tokens(reply: object) -> int | None:
    usage = reply.get("usage") if isinstance(reply, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None


def _attempt(name: str, endpoint: Endpoint, method: str, path: str, body: dict | None, deadline: float,
             judge) -> Check:
    """Send until `judge(reply)` returns (detail, answer, reasoning) or the deadline passes; backoff 0.5 s
    doubling to 5 s, the last try at the deadline. `judge` raises HttpError(retry=False) for an answer
    that waiting cannot fix. A last try cut short by the deadline does not hide what earlier tries saw."""
    curl, attempts, wait, seen = curl_line(endpoint, method, path, body), 0, 0.5, ""
    while True:
        attempts += 1
        start = time.monotonic()
        try:
            reply, latency = request(endpoint, method, path, body, timeout=max(deadline - start, 0.001))
            detail, answer, reasoning = judge(reply)
            return Check(name, True, latency, attempts, detail, curl, answer=answer, reasoning=reasoning)
        except HttpError as error:
            latency, remaining = time.monotonic() - start, deadline - time.monotonic()
            seen = seen if error.timed_out and seen else str(error)
            if not error.retry or remaining <= 0:
                return Check(name, False, latency, attempts, seen, curl)
        time.sleep(min(wait, remaining))
        wait = min(wait * 2, 5.0)


def check_endpoint(endpoint: Endpoint, *, timeout: float = 60.0, prompt: str = DEFAULT_PROMPT,
                   max_tokens: int = 64, each_model: bool = False) -> list[Check]:
    """The three checks in order, sharing one deadline; stops at the first failure. When
    `endpoint.model` is empty it is set to the first served name. `each_model`: then one chat request per
    other name /v1/models lists (a base served with LoRA adapters answers by each adapter's name)."""
    deadline = time.monotonic() + timeout
    served: list[str] = []
    checks = [_attempt("GET /health", endpoint, "GET", "/health", None, deadline, lambda reply: ("ok", "", ""))]
    if not checks[-1].ok:
        return checks

    def judge_models(reply) -> tuple[str, str, str]:
        names = served_names(reply)
        if not names:
            raise HttpError(f"no models listed: {str(reply)[:200]}", retry=True)
        if endpoint.model and endpoint.model not in names:
            raise HttpError(f"{endpoint.model!r} is not served; the server lists {names}", retry=False)
        endpoint.model = endpoint.model or names[0]
        served[:] = names
        return f"serves {endpoint.model!r}", "", ""

    checks.append(_attempt("GET /v1/models", endpoint, "GET", "/v1/models", None, deadline, judge_models))
    if not checks[-1].ok:
        return checks

    def judge_chat(reply) -> tuple[str, str, str]:
        reasoning, answer = split_reasoning(chat_message(reply))
        tokens = completion_tokens(reply)
        return f"{'?' if tokens is None else tokens} tokens", answer, reasoning

    others = [name for name in served if name != endpoint.model] if each_model else []
    for model in [endpoint.model] + others:
        body = chat_body(model, prompt, max_tokens)
        checks.append(_attempt("POST /v1/chat/completions", endpoint, "POST", "/v1/chat/completions", body,
                               deadline, judge_chat))
        checks[-1].model = model if others else ""
    return checks


def load_test(endpoint: Endpoint, *, requests: int, concurrency: int, prompt: str = DEFAULT_PROMPT,
              max_tokens: int = 32, timeout: float = 120.0) -> LoadResult:
    """`requests` chat calls, `concurrency` in flight; no retries: every failure counts."""
    body = chat_body(endpoint.model, prompt, max_tokens)

    def one(_: int) -> tuple[float, int, str]:
        try:
            reply, latency = request(endpoint, "POST", "/v1/chat/completions", body, timeout=timeout)
            chat_message(reply)
            return latency, completion_tokens(reply) or 0, ""
        except HttpError as error:
            return 0.0, 0, str(error)

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        outcomes = list(pool.map(one, range(requests)))
    result = LoadResult(requests, concurrency, 0, time.monotonic() - start)
    for latency, tokens, error in outcomes:
        if error:
            result.errors.append(error)
        else:
            result.ok += 1
            result.latencies_s.append(latency)
            result.completion_tokens += tokens
    return result
