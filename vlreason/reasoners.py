"""External text-only reasoners (SOPHIA's behaviour-policy "brain").

A reasoner turns text prompts into sampled solutions:

    solve(prompts, n, max_new_tokens, temperature, seed) -> list[list[str]]

(``n`` solutions per prompt, in prompt order; an EMPTY list for a prompt the reasoner
failed on, e.g. a server that kept failing after its retries: callers count it as failed
and never fill it in). Implementations:

* :class:`TransformersReasoner`: a local causal LM (``AutoModelForCausalLM`` +
  ``AutoTokenizer``), chat template when the tokenizer has one, seeded batched sampling;
* :class:`OpenAIReasoner`: any OpenAI-compatible chat-completions server (vLLM, SGLang,
  ``transformers serve``, hosted APIs) over the standard library's ``urllib``;
* ``kind=python``: ``reasoner.path="package.module:factory"``, ``factory(cfg) -> Reasoner``
  (a user's own reasoner, or a scripted one in tests).

:func:`build_reasoner` picks one from a :class:`ReasonerConfig`. With no model given, the
transformers reasoner uses :func:`tiny_reasoner_path`: a tiny random Qwen2 text LM built
offline into the vlreason cache (same tokenizer as the tiny VLMs). Its solutions are
random text, so it exercises the pipeline, not the method.

Both built-in backends return solutions through :func:`normalise_solution`: reasoning
models whose chat template opens ``<think>`` in the generation prompt (QwQ-32B, the
DeepSeek-R1 distills) write only ``...</think>...``, and so does a server without a
reasoning parser; the missing opening tag is put back, so a solution reaches the
rewards in the project's ``<think>...</think><answer>...</answer>`` format.

``vlreason.reasoner_cache`` stores answered prompts on disk (``reasoner.cache``), so a
resumed or repeated run makes no reasoner call twice.
"""

from __future__ import annotations

import http.client
import importlib
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from vlreason.config import doc

log = logging.getLogger(__name__)

REASONER_KINDS = ("transformers", "openai", "python")


@runtime_checkable
class Reasoner(Protocol):
    def solve(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
              seed: int) -> list[list[str]]:
        """``n`` sampled solutions for each prompt, in prompt order."""
        ...


@dataclass
class ReasonerConfig:
    kind: str = doc("transformers (a local causal LM) | openai (an OpenAI-compatible chat-completions "
                    "server) | python (reasoner.path='module:factory', factory(cfg) -> Reasoner).",
                    "transformers")
    path: str = doc("transformers: model directory or hub id (empty: the tiny random offline text LM, "
                    "a smoke test only); python: 'module:factory'.", "")
    base_url: str = doc("openai: server root including /v1, e.g. http://127.0.0.1:8000/v1.", "")
    model: str = doc("openai: the served model name sent in each request.", "")
    api_key_env: str = doc("openai: environment variable holding the API key (sent as a Bearer token "
                           "when set; local servers usually need none).", "OPENAI_API_KEY")
    timeout_s: float = doc("openai: seconds per HTTP request before it fails.", 300.0)
    max_retries: int = doc("openai: retries of a request that timed out, lost its connection, got HTTP "
                           "408/409/425/429/5xx or an unusable body; then the prompt fails (counted, no "
                           "solutions).", 3)
    retry_backoff_s: float = doc("openai: wait before retry k is retry_backoff_s * 2**k seconds (or the "
                                 "server's Retry-After; at most 60).", 1.0)
    concurrency: int = doc("openai: prompts in flight at once.", 8)
    cache: bool = doc("Cache answered prompts on disk by (model, prompt, sampling settings, seed): a resumed "
                      "or repeated run asks the reasoner nothing it already answered.", True)
    cache_dir: str = doc("Where the cache lives; empty: <output_dir>/reasoner_cache.", "")
    cache_chunk_prompts: int = doc("Prompts sent to the reasoner per stored chunk (0: a step's uncached "
                                   "prompts at once); smaller loses less to a kill, costs batching.", 0)
    system_prompt: str = doc("System message sent before each prompt; empty for none.", "")
    batch_size: int = doc("transformers: prompts per generate call (each with n samples).", 8)

    def validate(self) -> None:
        if self.kind not in REASONER_KINDS:
            raise ValueError(f"reasoner.kind must be one of {list(REASONER_KINDS)}, got '{self.kind}'")
        if self.kind == "openai" and not (self.base_url and self.model):
            raise ValueError("reasoner.kind=openai needs reasoner.base_url and reasoner.model")
        if self.kind == "python" and ":" not in self.path:
            raise ValueError("reasoner.kind=python needs reasoner.path='package.module:factory'")
        if self.batch_size < 1 or self.timeout_s <= 0 or self.max_retries < 0:
            raise ValueError("reasoner.batch_size must be >= 1, timeout_s > 0, max_retries >= 0")
        if self.retry_backoff_s < 0 or self.concurrency < 1 or self.cache_chunk_prompts < 0:
            raise ValueError("reasoner.retry_backoff_s must be >= 0, concurrency >= 1, cache_chunk_prompts >= 0")


def build_reasoner(cfg: ReasonerConfig) -> Reasoner:
    cfg.validate()
    if cfg.kind == "transformers":
        return TransformersReasoner(cfg.path or tiny_reasoner_path(), batch_size=cfg.batch_size,
                                    system_prompt=cfg.system_prompt)
    if cfg.kind == "openai":
        return OpenAIReasoner(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s,
                              max_retries=cfg.max_retries, system_prompt=cfg.system_prompt,
                              retry_backoff_s=cfg.retry_backoff_s, concurrency=cfg.concurrency)
    module, _, name = cfg.path.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reasoner.path='{cfg.path}' cannot be imported: {err}") from err
    reasoner = factory(cfg)
    if not isinstance(reasoner, Reasoner):
        raise ValueError(f"reasoner.path='{cfg.path}' returned {type(reasoner).__name__}, which has no solve()")
    return reasoner


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# <think>T</think> X <answer>A... with X (an R1-style summary) non-empty: X belongs to T
_BETWEEN = re.compile(r"(?P<think><think>.*?)</think>(?P<between>.*?)(?P<answer><answer>.*)", re.DOTALL)


def prompt_opens_think(rendered_prompt: str) -> bool:
    """True when a rendered generation prompt ends by opening ``<think>`` (QwQ-32B and the
    R1 distills end theirs with ``<think>\\n``): the model then writes only ``...</think>``."""
    return rendered_prompt.rstrip().endswith(THINK_OPEN)


def think_left_open(text: str) -> bool:
    """A reply that closes a think block it never opened: the prompt opened it (what a
    server without a reasoning parser returns for QwQ-32B / R1)."""
    return THINK_CLOSE in text and THINK_OPEN not in text


def normalise_solution(text: str, *, prompt_opened_think: bool) -> str:
    """A reasoner's solution in the target ``<think>T</think><answer>A</answer>`` format,
    as far as it can be recovered (pure; idempotent on its own output):

    * surrounding whitespace is stripped;
    * ``prompt_opened_think``: the generation prompt opened ``<think>``, so the text
      (``T</think>...``) gets it back in front, unless it starts with one itself;
    * text between ``</think>`` and ``<answer>`` (an R1-style summary) is moved to the
      end of the think block, when there is exactly one think block and one answer.

    Anything else is left as it is, for the rewards and the caller to judge: an
    answer-only solution (no think block) is NOT given an empty one (the strict format
    needs a non-empty think, and training on it would teach the VLM to skip reasoning);
    SOPHIA scores it as usual but never trains on it (``sophia/kept_malformed``)."""
    t = text.strip()
    if prompt_opened_think and not t.startswith(THINK_OPEN):
        t = THINK_OPEN + t
    if t.count(THINK_OPEN) == 1 and t.count(THINK_CLOSE) == 1 and t.count("<answer>") == 1:
        m = _BETWEEN.fullmatch(t)
        if m and m.group("between").strip():
            t = f"{m.group('think').rstrip()}\n\n{m.group('between').strip()}{THINK_CLOSE}{m.group('answer')}"
    return t


def _messages(system_prompt: str, prompt: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": prompt}]


# ---- local transformers causal LM ----------------------------------------------------------
class TransformersReasoner:
    """A local causal LM. Prompts go through the tokenizer's chat template when it has one
    (else raw text); sampling is seeded (``seed`` fixes the whole call) and batched
    (``batch_size`` prompts x ``n`` copies per ``generate``); ``temperature=0`` is greedy.
    A chat template that opens ``<think>`` in the generation prompt is detected on the
    rendered prompt and the tag is put back in front of each solution
    (:func:`normalise_solution`)."""

    def __init__(self, path: str | Path, *, batch_size: int = 8, system_prompt: str = "", device=None,
                 model=None, tokenizer=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = str(path)
        self.device = torch.device(device) if device else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.path)
        self.model = model or AutoModelForCausalLM.from_pretrained(self.path)
        self.model.to(self.device).eval().requires_grad_(False)
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def render(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(_messages(self.system_prompt, prompt),
                                                      add_generation_prompt=True, tokenize=False)
        return f"{self.system_prompt}\n\n{prompt}" if self.system_prompt else prompt

    def solve(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
              seed: int) -> list[list[str]]:
        import torch

        tok = self.tokenizer
        tok.padding_side = "left"
        out: list[list[str]] = []
        eos = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
               if isinstance(i, int) and i >= 0]
        devices = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else []
        with torch.random.fork_rng(devices=devices):  # seeded, without disturbing the run's RNG
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.batch_size):
                rendered = [self.render(p) for p in prompts[start:start + self.batch_size]]
                # each prompt repeated n times (rows i*n ... i*n+n-1); works greedy too
                enc = tok([r for r in rendered for _ in range(n)], return_tensors="pt",
                          padding=True, add_special_tokens=False).to(self.device)
                kwargs: dict[str, Any] = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens,
                                              pad_token_id=tok.pad_token_id,
                                              eos_token_id=eos or None)
                if temperature > 0:
                    kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
                with torch.no_grad():
                    ids = self.model.generate(**enc, **kwargs)
                texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for i, r in enumerate(rendered):
                    opened = prompt_opens_think(r)
                    out.append([normalise_solution(t, prompt_opened_think=opened)
                                for t in texts[i * n:(i + 1) * n]])
        return out


# ---- OpenAI-compatible server --------------------------------------------------------------
class ReasonerError(RuntimeError):
    """The reasoner server failed or answered something unusable."""


class _Retryable(Exception):
    """One failed try that may succeed when repeated (``wait``: the server's Retry-After)."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


# the server answered, but another try may work: timeout, conflict, rate limit, server errors
RETRY_HTTP = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0


class OpenAIReasoner:
    """Any OpenAI-compatible chat-completions server: one ``POST {base_url}/chat/completions``
    per prompt with ``n``, ``max_tokens``, ``temperature`` and ``seed`` (prompt i of a call:
    ``seed + 1000 i``), ``concurrency`` prompts in flight at once (threads; the order of
    the answers does not depend on it). Servers that return fewer than ``n`` choices (some
    ignore ``n``) are asked again for the rest (seed + 1, ...). A separate
    ``reasoning_content`` (vLLM / SGLang reasoning parsers, DeepSeek) is put back in front
    of the answer as ``<think>...</think>``; without a parser, a reply that closes
    ``</think>`` without opening it (the template opened it) gets ``<think>`` back in front
    (:func:`normalise_solution`).

    Faults: a try that times out, cannot connect, loses its connection, gets HTTP 408 /
    409 / 425 / 429 / 5xx, or a body that is not JSON or has no choices is retried up to
    ``max_retries`` times, waiting ``retry_backoff_s * 2**attempt`` seconds (or the
    server's ``Retry-After``, at most 60 s) in between; other HTTP errors (400, 401, 404,
    ...) are not retried. A prompt still failing then is a FAILED prompt: it comes back as
    an empty list (never a partial or invented solution), its error is in
    ``last_failures`` (``(index, message)``) and logged, and ``stats()`` counts it. A call
    in which every prompt failed raises :class:`ReasonerError` with the first error (the
    server is down or refuses everything). ``stats()``: requests, retries, failed prompts,
    and the tokens the server reported in ``usage``.

    The standard library's ``urllib`` rather than the ``openai`` package: no extra
    dependency for the core install, and every try, retry and failure is ours to count and
    report per prompt (the ``openai`` client retries inside itself and raises per call)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 300.0, max_retries: int = 2, system_prompt: str = "",
                 retry_backoff_s: float = 1.0, concurrency: int = 1):
        if not base_url or not model:
            raise ValueError("OpenAIReasoner needs base_url and model")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.system_prompt = system_prompt
        self.retry_backoff_s = retry_backoff_s
        self.concurrency = max(1, concurrency)
        self.last_failures: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._stats = {"requests": 0, "retries": 0, "failed_prompts": 0, "prompt_tokens": 0,
                       "completion_tokens": 0}

    def _count(self, **inc: int) -> None:
        with self._lock:
            for k, v in inc.items():
                self._stats[k] += v

    def stats(self) -> dict[str, int]:
        """Totals since construction: requests (HTTP tries), retries, failed prompts, and the
        prompt / completion tokens the server reported."""
        with self._lock:
            return dict(self._stats)

    def _try(self, data: bytes, headers: dict[str, str]) -> dict[str, Any]:
        """One HTTP try: the parsed reply, or _Retryable / ReasonerError."""
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        self._count(requests=1)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:  # the server answered with an error status
            detail = err.read()[:500].decode(errors="replace")
            msg = f"HTTP {err.code}: {detail}"
            if err.code in RETRY_HTTP:
                after = err.headers.get("Retry-After") if err.headers else None
                try:
                    wait = float(after) if after is not None else None
                except ValueError:
                    wait = None
                raise _Retryable(msg, wait) from err
            raise ReasonerError(msg) from err
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as err:
            raise _Retryable(f"{type(err).__name__}: {getattr(err, 'reason', err)} "
                             f"(timeout {self.timeout_s}s)") from err
        try:
            reply = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _Retryable(f"returned non-JSON: {raw[:200]!r}") from err
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
            raise _Retryable(f"returned no choices: {str(reply)[:200]}")
        usage = reply.get("usage") or {}
        if isinstance(usage, dict):
            self._count(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                        completion_tokens=int(usage.get("completion_tokens") or 0))
        return reply

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """One request with its retries; ReasonerError after the last try."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            try:
                return self._try(data, headers)
            except ReasonerError as err:
                raise ReasonerError(f"reasoner server {self.url} answered {err} (not retried)") from err
            except _Retryable as err:
                if attempt == self.max_retries:
                    raise ReasonerError(f"reasoner server {self.url} failed after {attempt + 1} tries: "
                                        f"{err}") from err
                wait = err.wait if err.wait is not None else self.retry_backoff_s * 2**attempt
                self._count(retries=1)
                log.info("reasoner server %s: %s; retry %d/%d in %.2fs", self.url, err, attempt + 1,
                         self.max_retries, wait)
                time.sleep(min(max(wait, 0.0), MAX_BACKOFF_S))
        raise AssertionError("unreachable")

    @staticmethod
    def choice_text(choice: dict[str, Any]) -> str:
        msg = choice.get("message") or {}
        content = (msg.get("content") or "").strip()
        reasoning = (msg.get("reasoning_content") or msg.get("reasoning") or "").strip()
        if reasoning and THINK_OPEN not in content:
            content = f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{content}"
        return normalise_solution(content, prompt_opened_think=think_left_open(content))

    def solve_one(self, prompt: str, n: int, max_new_tokens: int, temperature: float,
                  seed: int) -> list[str]:
        """``n`` solutions of one prompt (seeds seed, seed + 1, ... for the follow-up
        requests of a server that ignores n); ReasonerError when a request fails."""
        texts: list[str] = []
        request = 0
        while len(texts) < n:
            body = {"model": self.model, "messages": _messages(self.system_prompt, prompt),
                    "n": n - len(texts), "max_tokens": max_new_tokens, "temperature": temperature,
                    "seed": seed + request}
            choices = sorted(self.post(body)["choices"], key=lambda c: c.get("index", 0))
            texts += [self.choice_text(c) for c in choices][: n - len(texts)]
            request += 1
        return texts

    def solve(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
              seed: int) -> list[list[str]]:
        def one(i: int) -> list[str] | str:
            try:
                return self.solve_one(prompts[i], n, max_new_tokens, temperature, seed + i * 1_000)
            except ReasonerError as err:
                return str(err)

        if self.concurrency > 1 and len(prompts) > 1:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
                results = list(pool.map(one, range(len(prompts))))
        else:
            results = [one(i) for i in range(len(prompts))]
        self.last_failures = [(i, r) for i, r in enumerate(results) if isinstance(r, str)]
        self._count(failed_prompts=len(self.last_failures))
        for i, msg in self.last_failures:
            log.warning("reasoner: prompt %d of %d failed, no solutions: %s", i, len(prompts), msg)
        if prompts and len(self.last_failures) == len(prompts):
            raise ReasonerError(f"every prompt of the call failed ({len(prompts)}); first: "
                                f"{self.last_failures[0][1]}")
        return [[] if isinstance(r, str) else r for r in results]


# ---- the tiny offline text reasoner (smoke tests, the embedded default) --------------------
TINY_REASONER_VERSION = 1


def tiny_reasoner_path(*, seed: int = 0, vocab_size: int = 1024, hidden: int = 64, layers: int = 2) -> Path:
    """A tiny random ``Qwen2ForCausalLM`` with the tiny VLMs' tokenizer and chat template,
    built once into ``<vlreason cache>/tiny-models`` (random weights: its text is noise)."""
    from vlreason.models.tiny import CHAT_TEMPLATE, atomic_directory, build_tokenizer, cache_root

    key = f"reasoner-qwen2-v{vocab_size}-h{hidden}-l{layers}-s{seed}-b{TINY_REASONER_VERSION}"
    path = cache_root() / key
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path
