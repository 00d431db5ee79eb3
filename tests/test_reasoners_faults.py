"""The OpenAI-compatible reasoner client under a faulty stub server on 127.0.0.1: a reply
that times out, HTTP 500 / 429 (with Retry-After), a body that is not JSON, a connection
closed without an answer. Each is retried with exponential backoff and succeeds when the
fault passes; a fault that persists fails THAT prompt after max_retries + 1 tries with a
clear error (empty list, listed in last_failures, counted), never an invented solution;
client errors (HTTP 400) are not retried; a call where every prompt failed raises; and a
SOPHIA round whose reasoner fails on some captions completes, counts them
(sophia/reasoner_failed) and trains only on real solutions."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import vlreason.reasoners as reasoners
from vlreason.reasoners import OpenAIReasoner, ReasonerError

FAULTS = ("timeout", "500", "429", "malformed", "close", "no_choices")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        with srv.lock:
            srv.tries[user] = srv.tries.get(user, 0) + 1
            attempt = srv.tries[user]
        fault = srv.fault if attempt <= srv.fail_first or any(b in user for b in srv.always_bad) else None
        if fault == "timeout":
            threading.Event().wait(0.6)  # the client gives up after 0.2 s (not time.sleep: patched)
        elif fault == "500":
            return self._send(500, b"internal error")
        elif fault == "429":
            return self._send(429, b"slow down", {"Retry-After": "0.01"})
        elif fault == "400":
            return self._send(400, b"bad request: max_tokens too large")
        elif fault == "malformed":
            return self._send(200, b'{"choices": [{"index": 0, "message": ')
        elif fault == "no_choices":
            return self._send(200, b'{"error": "overloaded"}')
        elif fault == "close":
            self.close_connection = True  # no status line at all: RemoteDisconnected
            return
        text = srv.answer(user)
        choices = [{"index": i, "message": {"role": "assistant", "content": text}} for i in range(body["n"])]
        self._send(200, json.dumps({"choices": choices, "usage": {"prompt_tokens": 3, "completion_tokens": 5}}).encode())


@pytest.fixture
def stub():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock = threading.Lock()
    srv.tries, srv.fault, srv.fail_first, srv.always_bad = {}, None, 0, ()
    srv.answer = lambda user: f"<think>t</think><answer>{user}</answer>"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def sleeps(monkeypatch):
    """The backoff waits the client asks for (and takes, shortened: the test stays fast)."""
    waits: list[float] = []
    real = time.sleep
    monkeypatch.setattr(reasoners.time, "sleep", lambda s: (waits.append(s), real(min(s, 0.01))))
    return waits


def _client(stub, **kw) -> OpenAIReasoner:
    return OpenAIReasoner(stub.url, "m", **{"timeout_s": 0.2, "max_retries": 2, "retry_backoff_s": 0.05,
                                            "concurrency": 1, **kw})


@pytest.mark.parametrize("fault", FAULTS)
def test_a_passing_fault_is_retried_with_backoff(stub, sleeps, fault):
    stub.fault, stub.fail_first = fault, 2
    r = _client(stub)
    assert r.solve(["q"], 2, 8, 1.0, seed=0) == [["<think>t</think><answer>q</answer>"] * 2]
    assert stub.tries == {"q": 3}
    s = r.stats()
    assert (s["requests"], s["retries"], s["failed_prompts"]) == (3, 2, 0)
    # exponential backoff, or the server's Retry-After
    assert sleeps == ([0.01, 0.01] if fault == "429" else [0.05, 0.1])


@pytest.mark.parametrize("fault", FAULTS)
def test_a_persisting_fault_fails_that_prompt_after_n_tries_and_is_counted(stub, sleeps, fault):
    stub.fault, stub.always_bad = fault, ("bad",)
    r = _client(stub, max_retries=3, concurrency=2)
    out = r.solve(["good 0", "bad 1", "good 2", "bad 3"], 2, 8, 1.0, seed=0)
    # the failed prompts come back empty (no partial, no invented solution), the others whole
    assert out == [["<think>t</think><answer>good 0</answer>"] * 2, [],
                   ["<think>t</think><answer>good 2</answer>"] * 2, []]
    assert stub.tries == {"good 0": 1, "bad 1": 4, "good 2": 1, "bad 3": 4}
    assert [i for i, _ in r.last_failures] == [1, 3]
    expected = {"timeout": "timed out", "500": "HTTP 500: internal error", "429": "HTTP 429: slow down",
                "malformed": "non-JSON", "close": "RemoteDisconnected", "no_choices": "no choices"}[fault]
    for _, msg in r.last_failures:
        assert "failed after 4 tries" in msg and expected in msg, msg
    s = r.stats()
    assert (s["failed_prompts"], s["requests"], s["retries"]) == (2, 10, 6)
    assert s["completion_tokens"] == 10  # usage of the 2 answered requests
    # every prompt failing: the call raises, with the cause
    with pytest.raises(ReasonerError, match=f"every prompt of the call failed \\(2\\).*{expected}"):
        r.solve(["bad a", "bad b"], 1, 8, 1.0, seed=0)


def test_client_errors_are_not_retried(stub, sleeps):
    stub.fault, stub.always_bad = "400", ("bad",)
    r = _client(stub, max_retries=5)
    assert r.solve(["bad", "ok"], 1, 8, 1.0, seed=0) == [[], ["<think>t</think><answer>ok</answer>"]]
    assert stub.tries["bad"] == 1 and sleeps == []
    assert "HTTP 400: bad request" in r.last_failures[0][1] and "not retried" in r.last_failures[0][1]


def test_a_server_that_ignores_n_and_then_fails_gives_no_partial_answer(stub, sleeps):
    """The first request for "q" answers 1 of n=3 (as a server that ignores n); the
    follow-up request for the rest fails: "q" fails whole, its one text is not passed on as
    if it were the sample; "ok" is answered in full."""
    stub.fault = "500"
    r = _client(stub, max_retries=0)
    orig = r.post

    def post(body):
        reply = orig(body)
        if body["messages"][-1]["content"] == "q":
            reply["choices"] = reply["choices"][:1]
            stub.always_bad = ("q",)  # the follow-up for "q" gets HTTP 500
        return reply

    r.post = post
    assert r.solve(["q", "ok"], 3, 8, 1.0, seed=0) == [[], ["<think>t</think><answer>ok</answer>"] * 3]
    assert stub.tries["q"] == 2 and r.stats()["failed_prompts"] == 1


def _png(color: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (84, 84), color).save(buf, "PNG")
    return buf.getvalue()


def test_a_sophia_round_counts_failed_captions_and_trains_only_on_real_solutions(stub, tmp_path):
    from recipes.sophia import SophiaRecipe
    from vlreason.data.schema import canonical_row, save_canonical
    from vlreason.recipe_base import run_recipe

    answers = {"What colour is shape one?": "red", "What colour is shape two?": "blue"}
    data = save_canonical([canonical_row(id=f"r{i}", images=[_png(a)], question=q, answer=a, source="test")
                           for i, (q, a) in enumerate(answers.items())], tmp_path / "data")
    stub.answer = lambda user: f"<think>t</think><answer>{next(a for q, a in answers.items() if q in user)}</answer>"
    stub.fault, stub.always_bad = "500", ("shape one",)  # every caption of row r0 fails
    run = tmp_path / "run"
    run_recipe(SophiaRecipe, None, [f"data.train={data}", f"output_dir={run}", "max_steps=1", "progress=false",
                                    "sophia.rounds=0", "sophia.warmup_steps=0", "sophia.rows_per_round=0",
                                    "trackers=[jsonl]", "prompts_per_step=2", "sophia.num_captions=2",
                                    "sophia.num_solutions=2", "sophia.caption_max_new_tokens=8",
                                    "reasoner.kind=openai", f"reasoner.base_url={stub.url}", "reasoner.model=m",
                                    "reasoner.max_retries=1", "reasoner.retry_backoff_s=0.01",
                                    "reasoner.timeout_s=5"])
    (rec,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # the 2 captions of r0 failed (2 tries each), counted; r1's are answered and its solution kept
    assert rec["sophia/reasoner_failed"] == 2 and rec["sophia/reasoner_failed_total"] == 2
    assert rec["reasoner/retries"] == 2 and rec["reasoner/requests"] == 6
    assert rec["sophia/kept_rows"] == 1 and rec["loss"] > 0
    # the failed captions are not averaged in as reward 0, nor cached (a rerun asks again)
    assert rec["sophia/caption_reward"] == 1.0 and rec["reasoner/cache_misses"] == 4
    assert len((run / "reasoner_cache" / "calls-rank0.jsonl").read_text().splitlines()) == 2
