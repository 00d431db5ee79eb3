"""vlreason's OpenAI-compatible reasoner client against a REAL server: ``transformers
serve`` started on a free 127.0.0.1 port with a tiny random Llama text model built offline
(no network, no download), then a SOPHIA round run against it.

A Llama (not the tiny Qwen2 reasoner) on purpose: for Qwen2 models ``transformers serve``
parses the reply with Qwen's response template, which needs the closing ``<|im_end|>``;
a random model cut at ``max_tokens`` never writes it and the server returns an empty
``content``. A model type without a response template streams the raw text through.

Needs the server's own dependencies (fastapi, uvicorn, openai, pydantic: the
``transformers[serving]`` set); skipped, saying which is missing, without them."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SERVE_DEPS = ("fastapi", "uvicorn", "openai", "pydantic")
MISSING = [m for m in SERVE_DEPS if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"transformers serve needs {', '.join(MISSING)} "
                                                      "(pip install fastapi uvicorn openai)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_llama(path: Path) -> Path:
    """A tiny random LlamaForCausalLM with the tiny VLMs' tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vlreason.reasoners import tiny_reasoner_path

    tok = AutoTokenizer.from_pretrained(tiny_reasoner_path())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                      bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = tiny_llama(tmp_path_factory.mktemp("served") / "tiny-llama")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    # the console script's module (transformers has no __main__); same interpreter as the tests
    cmd = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
           "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not answer /health in 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", str(model)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_openai_reasoner_against_transformers_serve(served):
    from vlreason.reasoners import OpenAIReasoner

    url, model = served
    r = OpenAIReasoner(url, model, timeout_s=60, max_retries=0, concurrency=1)
    out = r.solve(["What is 2 + 2?", "Name a colour."], 2, 12, 1.0, seed=5)
    assert [len(x) for x in out] == [2, 2]
    assert all(isinstance(t, str) and t for x in out for t in x), out  # random text, not empty
    stats = r.stats()
    # transformers serve ignores n: the client asks again for the rest (2 requests per prompt)
    assert stats["requests"] == 4 and stats["failed_prompts"] == 0 and stats["retries"] == 0
    assert stats["completion_tokens"] > 0 and stats["prompt_tokens"] > 0
    # the server seeds torch from the request's seed: the same call gives the same texts
    assert r.solve(["What is 2 + 2?", "Name a colour."], 2, 12, 1.0, seed=5) == out
    # a model it does not serve: HTTP 4xx, not retried, the whole call fails with a clear error
    from vlreason.reasoners import ReasonerError

    with pytest.raises(ReasonerError, match="not retried"):
        OpenAIReasoner(url, "no/such-model", timeout_s=60, max_retries=3).solve(["q"], 1, 4, 1.0, seed=0)


def test_a_sophia_round_against_transformers_serve(served, tmp_path):
    from recipes.sophia import SophiaRecipe
    from vlreason.recipe_base import run_recipe

    url, model = served
    run = tmp_path / "run"
    run_recipe(SophiaRecipe, None, [f"output_dir={run}", "max_steps=1", "progress=false", "trackers=[jsonl]",
                                    "sophia.rounds=0", "sophia.warmup_steps=0", "sophia.rows_per_round=0",
                                    "prompts_per_step=2", "sophia.num_captions=2", "sophia.num_solutions=2",
                                    "sophia.caption_max_new_tokens=8", "sophia.solution_max_new_tokens=12",
                                    "reasoner.kind=openai", f"reasoner.base_url={url}", f"reasoner.model={model}",
                                    "reasoner.max_retries=0", "reasoner.timeout_s=60", "reasoner.concurrency=2"])
    (rec,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # 2 rows x 2 captions, each asked of the server (n=2 -> 2 requests), none failed
    assert rec["sophia/reasoner_failed"] == 0 and rec["reasoner/cache_misses"] == 4
    assert rec["reasoner/requests"] == 8 and rec["reasoner/completion_tokens"] > 0
    assert 0.0 <= rec["sophia/caption_reward"] <= 1.0 and "loss" in rec
    lines = (run / "reasoner_cache" / "calls-rank0.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(len(json.loads(x)["solutions"]) == 2 for x in lines)
