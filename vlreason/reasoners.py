"""External text-only reasoners (SOPHIA's behaviour-policy "brain").

A reasoner turns text prompts into sampled solutions:

    solve(prompts, n, max_new_tokens, temperature, seed) -> list[list[str]]

(``n`` solutions per prompt, in prompt order). Implementations:

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
"""

from __future__ import annotations

import importlib
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from vlreason.config import doc

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
    max_retries: int = doc("openai: retries of a request that failed to connect or timed out.", 2)
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


def build_reasoner(cfg: ReasonerConfig) -> Reasoner:
    cfg.validate()
    if cfg.kind == "transformers":
        return TransformersReasoner(cfg.path or tiny_reasoner_path(), batch_size=cfg.batch_size,
                                    system_prompt=cfg.system_prompt)
    if cfg.kind == "openai":
        return OpenAIReasoner(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s,
                              max_retries=cfg.max_retries, system_prompt=cfg.system_prompt)
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


class OpenAIReasoner:
    """Any OpenAI-compatible chat-completions server: one ``POST {base_url}/chat/completions``
    per prompt with ``n``, ``max_tokens``, ``temperature`` and ``seed``. Servers that return
    fewer than ``n`` choices (some ignore ``n``) are asked again for the rest (seed + 1, ...).
    A separate ``reasoning_content`` (vLLM / SGLang reasoning parsers, DeepSeek) is put back
    in front of the answer as ``<think>...</think>``; without a parser, a reply that closes
    ``</think>`` without opening it (the template opened it) gets ``<think>`` back in front
    (:func:`normalise_solution`)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 300.0, max_retries: int = 2, system_prompt: str = ""):
        if not base_url or not model:
            raise ValueError("OpenAIReasoner needs base_url and model")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.system_prompt = system_prompt

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as err:  # the server answered: no retry
                detail = err.read()[:500].decode(errors="replace")
                raise ReasonerError(f"reasoner server {self.url} answered HTTP {err.code}: {detail}") from err
            except (urllib.error.URLError, TimeoutError, OSError) as err:
                if attempt == self.max_retries:
                    raise ReasonerError(
                        f"reasoner server {self.url} failed after {attempt + 1} tries "
                        f"(timeout {self.timeout_s}s): {getattr(err, 'reason', err)}") from err
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise ReasonerError(f"reasoner server {self.url} returned non-JSON: {raw[:200]!r}") from err

    @staticmethod
    def choice_text(choice: dict[str, Any]) -> str:
        msg = choice.get("message") or {}
        content = (msg.get("content") or "").strip()
        reasoning = (msg.get("reasoning_content") or msg.get("reasoning") or "").strip()
        if reasoning and THINK_OPEN not in content:
            content = f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{content}"
        return normalise_solution(content, prompt_opened_think=think_left_open(content))

    def solve(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
              seed: int) -> list[list[str]]:
        out = []
        for i, prompt in enumerate(prompts):
            texts: list[str] = []
            request = 0
            while len(texts) < n:
                body = {"model": self.model, "messages": _messages(self.system_prompt, prompt),
                        "n": n - len(texts), "max_tokens": max_new_tokens, "temperature": temperature,
                        "seed": seed + i * 1_000 + request}
                reply = self.post(body)
                choices = reply.get("choices")
                if not isinstance(choices, list) or not choices:
                    raise ReasonerError(f"reasoner server {self.url} returned no choices: {str(reply)[:200]}")
                choices = sorted(choices, key=lambda c: c.get("index", 0))
                texts += [self.choice_text(c) for c in choices][: n - len(texts)]
                request += 1
            out.append(texts)
        return out


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
