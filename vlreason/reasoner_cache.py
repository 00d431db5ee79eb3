"""An on-disk cache of reasoner calls, so a resumed or repeated SOPHIA round asks the
reasoner nothing it already answered.

:class:`ReasonerCache` is a directory of append-only JSON-lines files (one per writer
process, ``calls-rank<R>.jsonl``); each line is one answered prompt::

    {"key": "<sha256>", "solutions": ["...", ...]}

The key is the SHA-256 of (reasoner identity, prompt, n, max_new_tokens, temperature,
seed, the prompt's index in its call): the identity names the model (``kind``, ``path`` /
``base_url`` + ``model``, system prompt), so a different reasoner or different sampling
settings never share entries. A batch of answered prompts is appended with ONE
``os.write`` on an ``O_APPEND`` descriptor and ``fsync``-ed before the caller sees it:
a process killed (even ``kill -9``) mid-write leaves at most a torn last line, which the
next open ignores and cuts off (``torn`` counts it). Prompts the reasoner failed on are
never cached (a rerun asks again).

:class:`CachedReasoner` wraps any reasoner with it: cached prompts are answered from the
files, the others are sent to the wrapped reasoner in chunks of ``chunk_prompts`` (0: all
at once), each chunk stored as soon as it returns, so a killed round loses at most the
chunk in flight. When nothing of a call is cached and it goes out in one chunk, the
wrapped reasoner sees exactly the call it would have seen without the cache (same seed);
a partly cached call sends its missing prompts with a seed derived from (seed, first
missing index), a valid but not bit-identical sample. ``hits`` / ``misses`` count
prompts, ``calls`` the wrapped reasoner's ``solve`` calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def cache_key(identity: dict[str, Any], prompt: str, n: int, max_new_tokens: int, temperature: float,
              seed: int, index: int) -> str:
    payload = json.dumps({"identity": identity, "prompt": prompt, "n": n, "max_new_tokens": max_new_tokens,
                          "temperature": float(temperature), "seed": seed, "index": index},
                         sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class ReasonerCache:
    """Append-only on-disk map key -> list of solutions (see the module docstring)."""

    def __init__(self, directory: str | Path, *, rank: int = 0):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"calls-rank{rank}.jsonl"
        self.entries: dict[str, list[str]] = {}
        self.torn = 0
        self._repair(self.path)
        for file in sorted(self.dir.glob("calls-rank*.jsonl")):
            self._load(file)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def _repair(self, path: Path) -> None:
        """Cut a torn last line (a writer killed mid-append) off this process's own file."""
        if not path.is_file():
            return
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self.torn += 1
            log.warning("reasoner cache %s: dropping a torn last record (%d bytes)", path, len(data) - end)
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())

    def _load(self, path: Path) -> None:
        for line in path.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key, sols = rec["key"], rec["solutions"]
            except (ValueError, KeyError, TypeError):  # another writer's torn line
                self.torn += 1
                continue
            if isinstance(key, str) and isinstance(sols, list):
                self.entries[key] = [str(s) for s in sols]

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> list[str] | None:
        return self.entries.get(key)

    def put_many(self, items: list[tuple[str, list[str]]]) -> None:
        """Append the records in one write and fsync them (durable when this returns)."""
        if not items:
            return
        data = "".join(json.dumps({"key": k, "solutions": list(s)}, ensure_ascii=False) + "\n"
                       for k, s in items).encode()
        with self._lock:
            view = memoryview(data)
            while view:  # a regular file takes it in one write; loop only on a short write
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
            for k, s in items:
                self.entries[k] = list(s)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def reasoner_identity(cfg) -> dict[str, Any]:
    """What names the model behind a ReasonerConfig (part of every cache key)."""
    ident: dict[str, Any] = {"kind": cfg.kind, "system_prompt": cfg.system_prompt}
    if cfg.kind == "openai":
        ident.update(base_url=cfg.base_url.rstrip("/"), model=cfg.model)
    else:
        ident.update(path=cfg.path)
    return ident


def derived_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + (index + 1) * 104_729 + 7_919) % (2**31 - 1)


class CachedReasoner:
    """A reasoner whose answers are read from / written to a :class:`ReasonerCache`.
    Prompts the wrapped reasoner failed on (an empty list) are passed on, not cached."""

    def __init__(self, inner, cache: ReasonerCache, identity: dict[str, Any], *, chunk_prompts: int = 0):
        self.inner = inner
        self.cache = cache
        self.identity = identity
        self.chunk_prompts = chunk_prompts
        self.hits = self.misses = self.calls = 0

    def __getattr__(self, name):  # stats(), last_failures, ... of the wrapped reasoner
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def solve(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
              seed: int) -> list[list[str]]:
        keys = [cache_key(self.identity, p, n, max_new_tokens, temperature, seed, i) for i, p in enumerate(prompts)]
        out: list[list[str] | None] = [self.cache.get(k) for k in keys]
        missing = [i for i, o in enumerate(out) if o is None]
        self.hits += len(prompts) - len(missing)
        self.misses += len(missing)
        size = self.chunk_prompts or len(missing) or 1
        for start in range(0, len(missing), size):
            chunk = missing[start:start + size]
            s = seed if len(chunk) == len(prompts) else derived_seed(seed, chunk[0])
            got = self.inner.solve([prompts[i] for i in chunk], n, max_new_tokens, temperature, s)
            self.calls += 1
            if len(got) != len(chunk):
                raise RuntimeError(f"the reasoner returned {len(got)} answers for {len(chunk)} prompts")
            self.cache.put_many([(keys[i], list(sols)) for i, sols in zip(chunk, got) if len(sols) == n])
            for i, sols in zip(chunk, got):
                out[i] = list(sols)
        return out  # type: ignore[return-value]

    def cache_stats(self) -> dict[str, int]:
        return {"reasoner/cache_hits": self.hits, "reasoner/cache_misses": self.misses,
                "reasoner/calls": self.calls, "reasoner/cache_entries": len(self.cache)}


def with_cache(reasoner, cfg, run_dir: str | Path, *, rank: int = 0):
    """``reasoner`` wrapped in a :class:`CachedReasoner` when ``cfg.cache`` (a
    ReasonerConfig); the cache lives in ``cfg.cache_dir`` or ``<run_dir>/reasoner_cache``."""
    if not cfg.cache:
        return reasoner
    directory = Path(cfg.cache_dir) if cfg.cache_dir else Path(run_dir) / "reasoner_cache"
    cache = ReasonerCache(directory, rank=rank)
    log.info("reasoner cache %s: %d answered prompts%s", directory, len(cache),
             f", {cache.torn} torn records dropped" if cache.torn else "")
    return CachedReasoner(reasoner, cache, reasoner_identity(cfg), chunk_prompts=cfg.cache_chunk_prompts)
