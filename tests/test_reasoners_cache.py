"""The on-disk reasoner cache: identical (model, prompt, sampling settings, seed) requests
are answered from disk, anything different is asked again; the wrapped reasoner sees the
uncached call unchanged; failed prompts are not stored; a reopened cache (a resumed run)
answers what was stored; a writer killed with SIGKILL leaves every acknowledged record
readable and at most a torn last line, which is dropped and cut off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vlreason.reasoner_cache import (
    CachedReasoner,
    ReasonerCache,
    cache_key,
    derived_seed,
    reasoner_identity,
    with_cache,
)
from vlreason.reasoners import ReasonerConfig

IDENT = {"kind": "python", "path": "x:y", "system_prompt": ""}


class Counting:
    """Answers f"{prompt}|{seed}|{j}"; fails (empty list) on prompts containing 'FAIL'."""

    def __init__(self):
        self.calls: list[tuple[list[str], int, int, float, int]] = []

    def solve(self, prompts, n, max_new_tokens, temperature, seed):
        self.calls.append((list(prompts), n, max_new_tokens, temperature, seed))
        return [[] if "FAIL" in p else [f"{p}|{seed}|{j}" for j in range(n)] for p in prompts]

    def stats(self):
        return {"requests": len(self.calls)}


def test_identical_requests_are_answered_from_disk_and_others_are_not(tmp_path):
    inner = Counting()
    r = CachedReasoner(inner, ReasonerCache(tmp_path / "c"), IDENT)
    prompts = ["a", "b", "c"]
    first = r.solve(prompts, 2, 16, 1.0, seed=7)
    # all missing: the wrapped reasoner sees exactly the uncached call
    assert inner.calls == [(prompts, 2, 16, 1.0, 7)] and first == [[f"{p}|7|{j}" for j in range(2)] for p in prompts]
    assert r.solve(prompts, 2, 16, 1.0, seed=7) == first and len(inner.calls) == 1
    assert (r.hits, r.misses, r.calls) == (3, 3, 1)
    # any change of sampling settings or seed is a new request
    for args in ((prompts, 3, 16, 1.0, 7), (prompts, 2, 17, 1.0, 7), (prompts, 2, 16, 0.5, 7), (prompts, 2, 16, 1.0, 8)):
        r.solve(*args)
    assert len(inner.calls) == 5 and r.hits == 3
    # a different model (identity) shares nothing, even in the same directory
    other = CachedReasoner(Counting(), ReasonerCache(tmp_path / "c"), {**IDENT, "path": "x:z"})
    other.solve(prompts, 2, 16, 1.0, seed=7)
    assert other.hits == 0 and other.calls == 1
    # a partly cached call: only the missing prompts go out, with a derived seed
    mixed = ["a", "new", "c"]
    out = r.solve(mixed, 2, 16, 1.0, seed=7)
    assert inner.calls[-1] == (["new"], 2, 16, 1.0, derived_seed(7, 1))
    assert out[0] == first[0] and out[2] == first[2] and out[1][0].startswith("new|")
    assert r.cache_stats() == {"reasoner/cache_hits": 5, "reasoner/cache_misses": 16, "reasoner/calls": 6,
                               "reasoner/cache_entries": len(r.cache)}
    assert r.stats() == {"requests": 6}  # the wrapped reasoner's own counters stay reachable


def test_failed_prompts_are_not_stored_and_a_reopened_cache_answers_the_rest(tmp_path):
    inner = Counting()
    r = CachedReasoner(inner, ReasonerCache(tmp_path), IDENT, chunk_prompts=2)
    prompts = ["p0", "FAIL1", "p2", "p3", "p4"]
    out = r.solve(prompts, 1, 8, 1.0, seed=3)
    assert out[1] == [] and all(len(o) == 1 for i, o in enumerate(out) if i != 1)
    # chunks of 2 (each stored when it returns); the first chunk is not the whole call: derived seeds
    assert [c[0] for c in inner.calls] == [["p0", "FAIL1"], ["p2", "p3"], ["p4"]]
    assert [c[4] for c in inner.calls] == [derived_seed(3, 0), derived_seed(3, 2), derived_seed(3, 4)]
    lines = (tmp_path / "calls-rank0.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(set(json.loads(x)) == {"key", "solutions"} for x in lines)
    # a resumed run: a fresh process opens the same directory; only the failed prompt is asked again
    inner2 = Counting()
    again = CachedReasoner(inner2, ReasonerCache(tmp_path), IDENT)
    assert again.solve(prompts, 1, 8, 1.0, seed=3) == out
    assert inner2.calls == [(["FAIL1"], 1, 8, 1.0, derived_seed(3, 1))]
    assert (again.hits, again.misses) == (4, 1)


def test_identity_key_and_with_cache(tmp_path):
    inner = Counting()
    assert with_cache(inner, ReasonerConfig(cache=False), tmp_path) is inner and not list(tmp_path.iterdir())
    wrapped = with_cache(inner, ReasonerConfig(kind="python", path="x:y"), tmp_path)
    assert isinstance(wrapped, CachedReasoner) and wrapped.cache.dir == tmp_path / "reasoner_cache"
    assert with_cache(inner, ReasonerConfig(cache_dir=str(tmp_path / "elsewhere")), tmp_path).cache.dir == (
        tmp_path / "elsewhere")
    a = ReasonerConfig(kind="openai", base_url="http://h:1/v1/", model="m")
    b = ReasonerConfig(kind="openai", base_url="http://h:1/v1", model="m", timeout_s=5, concurrency=2)
    assert reasoner_identity(a) == reasoner_identity(b)  # transport settings do not change answers
    assert reasoner_identity(a) != reasoner_identity(ReasonerConfig(kind="openai", base_url="http://h:1/v1", model="n"))
    assert reasoner_identity(a) != reasoner_identity(ReasonerConfig(kind="openai", base_url="http://h:1/v1", model="m",
                                                                    system_prompt="s"))
    k = cache_key(IDENT, "p", 2, 8, 1.0, 0, 0)
    assert k == cache_key(IDENT, "p", 2, 8, 1, 0, 0) and len({k, cache_key(IDENT, "p", 2, 8, 1.0, 0, 1),
                                                             cache_key(IDENT, "q", 2, 8, 1.0, 0, 0)}) == 3


WRITER = """
import sys
from vlreason.reasoner_cache import ReasonerCache
cache = ReasonerCache(sys.argv[1])
i = 0
while True:
    cache.put_many([(f"k{i}-{j}", ["x" * 2000, str(i)]) for j in range(4)])
    print(i, flush=True)   # acknowledged: the 4 records of batch i are on disk
    i += 1
"""


def test_a_writer_killed_with_sigkill_loses_nothing_it_acknowledged(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    acked = -1
    deadline = time.monotonic() + 60
    while acked < 20 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert acked >= 20, "the writer did not start"
    cache = ReasonerCache(tmp_path)
    assert all(cache.get(f"k{i}-{j}") == ["x" * 2000, str(i)] for i in range(acked + 1) for j in range(4))
    # a torn last record (a kill in the middle of a write) is dropped and cut off; appends go on
    path = tmp_path / "calls-rank0.jsonl"
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b'{"key": "torn", "solutions": ["hal')
    cache = ReasonerCache(tmp_path)
    assert cache.torn == 1 and cache.get("torn") is None and path.stat().st_size == size
    cache.put_many([("after", ["ok"])])
    assert ReasonerCache(tmp_path).get("after") == ["ok"] and ReasonerCache(tmp_path).torn == 0
