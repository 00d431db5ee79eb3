"""External reasoners: the tiny local transformers LM (seeded, n per prompt), the
OpenAI-compatible client against a local HTTP server on 127.0.0.1 (request body, auth,
servers that ignore n, HTTP errors, timeouts), and build_reasoner's kinds."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlreason.reasoners import (
    OpenAIReasoner,
    Reasoner,
    ReasonerConfig,
    ReasonerError,
    TransformersReasoner,
    build_reasoner,
    tiny_reasoner_path,
)
from vlreason.rewards import hard_format_and_correct


@pytest.fixture(scope="module")
def tiny_reasoner() -> TransformersReasoner:
    return TransformersReasoner(tiny_reasoner_path(), batch_size=2)


def test_transformers_reasoner_is_seeded_and_returns_n_per_prompt(tiny_reasoner):
    prompts = ["What colour is the shape?", "How many circles?", "Describe three squares."]
    a = tiny_reasoner.solve(prompts, 3, 12, 1.0, seed=5)
    assert [len(x) for x in a] == [3, 3, 3] and all(isinstance(t, str) for x in a for t in x)
    assert tiny_reasoner.solve(prompts, 3, 12, 1.0, seed=5) == a
    assert tiny_reasoner.solve(prompts, 3, 12, 1.0, seed=6) != a
    greedy = tiny_reasoner.solve(prompts[:1], 2, 8, 0.0, seed=0)
    assert greedy[0][0] == greedy[0][1]
    assert isinstance(tiny_reasoner, Reasoner)


def _reply(mode: str, user: str, seed: int, i: int) -> dict[str, str]:
    if mode == "open_think":  # QwQ / R1 served without a reasoning parser: the template opened <think>
        return {"content": f"I look at it.\n</think>\n\n<answer>{user}</answer>"}
    if mode == "answer_only":
        return {"content": f"  <answer>{user}</answer>\n"}
    reply = {"content": f"<answer>{user}-{seed}-{i}</answer>"}
    if mode == "reasoning":  # a reasoning parser split the think text off
        reply["reasoning_content"] = "r"
    return reply


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if srv.mode == "error":
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"overloaded")
            return
        if srv.mode == "slow":
            time.sleep(1.0)
        n = 1 if srv.mode == "ignore_n" else body["n"]
        user = body["messages"][-1]["content"]
        choices = [{"index": i, "message": {"role": "assistant", **_reply(srv.mode, user, body["seed"], i)}}
                   for i in reversed(range(n))]  # out of order on purpose
        data = json.dumps({"choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out first (mode "slow")
            pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests, srv.mode = [], "ok"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def test_openai_reasoner_request_and_parsing(server, monkeypatch):
    monkeypatch.setenv("TEST_REASONER_KEY", "sekret")
    r = OpenAIReasoner(_url(server) + "/", "qwq", api_key_env="TEST_REASONER_KEY", timeout_s=5,
                       system_prompt="be brief")
    out = r.solve(["p0", "p1"], 3, 77, 0.6, seed=10)
    assert out == [[f"<answer>p0-10-{i}</answer>" for i in range(3)],
                   [f"<answer>p1-1010-{i}</answer>" for i in range(3)]]
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sekret"
    assert req["body"] == {"model": "qwq", "n": 3, "max_tokens": 77, "temperature": 0.6, "seed": 10,
                           "messages": [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "p0"}]}


def test_openai_reasoner_fills_n_when_server_ignores_it_and_keeps_reasoning(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.mode = "ignore_n"
    out = OpenAIReasoner(_url(server), "m", timeout_s=5).solve(["q"], 3, 8, 1.0, seed=0)
    assert out == [["<answer>q-0-0</answer>", "<answer>q-1-0</answer>", "<answer>q-2-0</answer>"]]
    assert [q["body"]["n"] for q in server.requests] == [3, 2, 1] and server.requests[0]["auth"] is None
    server.mode = "reasoning"
    assert OpenAIReasoner(_url(server), "m", timeout_s=5).solve(["q"], 1, 8, 1.0, seed=0) == [
        ["<think>r</think><answer>q-0-0</answer>"]]


def test_openai_reasoner_restores_the_think_block_the_template_opened(server):
    """A server without a reasoning parser returns QwQ's / R1's text after the prompt's
    "<think>\\n": it closes </think> without opening it. The solution comes back well formed
    and the hard (format and correct) reward accepts it; answer-only replies are left as
    they are (no empty think invented), and the hard reward refuses them."""
    server.mode = "open_think"
    (out,) = OpenAIReasoner(_url(server), "qwq", timeout_s=5).solve(["7"], 2, 8, 1.0, seed=0)
    assert out == ["<think>I look at it.\n</think>\n\n<answer>7</answer>"] * 2
    assert all(hard_format_and_correct(t, "7") == 1.0 for t in out)
    server.mode = "answer_only"
    (out,) = OpenAIReasoner(_url(server), "m", timeout_s=5).solve(["7"], 1, 8, 1.0, seed=0)
    assert out == ["<answer>7</answer>"] and hard_format_and_correct(out[0], "7") == 0.0
    # reasoning_content + a content that closes a think block again: kept whole, malformed
    msg = {"message": {"content": "more</think><answer>7</answer>", "reasoning_content": "r"}}
    assert OpenAIReasoner.choice_text(msg) == "<think>r</think>more</think><answer>7</answer>"
    assert hard_format_and_correct(OpenAIReasoner.choice_text(msg), "7") == 0.0
    msg = {"message": {"content": "\n<answer>7</answer>", "reasoning": " I look. "}}
    assert OpenAIReasoner.choice_text(msg) == "<think>I look.</think><answer>7</answer>"


def test_openai_reasoner_errors_are_clear(server):
    """(The fault matrix, retries and per-prompt counting: tests/test_reasoners_faults.py.)"""
    server.mode = "error"
    with pytest.raises(ReasonerError, match="failed after 2 tries: HTTP 503: overloaded"):
        OpenAIReasoner(_url(server), "m", timeout_s=5, max_retries=1, retry_backoff_s=0.01).solve(
            ["q"], 1, 8, 1.0, seed=0)
    server.mode = "slow"
    with pytest.raises(ReasonerError, match="failed after 1 tries"):
        OpenAIReasoner(_url(server), "m", timeout_s=0.2, max_retries=0).solve(["q"], 1, 8, 1.0, seed=0)
    # a closed port on 127.0.0.1: connection refused, after the retries
    closed = f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    with pytest.raises(ReasonerError, match="failed after 2 tries"):
        OpenAIReasoner(closed, "m", timeout_s=1, max_retries=1, retry_backoff_s=0.01).solve(
            ["q"], 1, 8, 1.0, seed=0)


class _Echo:
    def __init__(self, cfg):
        self.cfg = cfg

    def solve(self, prompts, n, max_new_tokens, temperature, seed):
        return [[p] * n for p in prompts]


def echo_factory(cfg):
    return _Echo(cfg)


def test_build_reasoner_kinds():
    assert isinstance(build_reasoner(ReasonerConfig(kind="openai", base_url="http://127.0.0.1:1/v1", model="m")),
                      OpenAIReasoner)
    r = build_reasoner(ReasonerConfig(kind="python", path=f"{__name__}:echo_factory"))
    assert r.solve(["a"], 2, 1, 1.0, 0) == [["a", "a"]]
    assert isinstance(build_reasoner(ReasonerConfig(kind="transformers", path=str(tiny_reasoner_path()))),
                      TransformersReasoner)
    for bad in (ReasonerConfig(kind="vllm"), ReasonerConfig(kind="openai"), ReasonerConfig(kind="python", path="x"),
                ReasonerConfig(kind="python", path="no_such_module_xyz:f")):
        with pytest.raises(ValueError):
            build_reasoner(bad)
