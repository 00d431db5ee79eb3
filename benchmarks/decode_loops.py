"""Rollout decode loops side by side: tokens/s of today's prefix-shared loop and its alternatives.

    python benchmarks/decode_loops.py [--size mid] [--rounds 3] [--prompts 2] [-G 8] [--max-new-tokens 32]

On one model (``bench_common.SIZES``; ``mid`` by default: the real vocabulary, hidden 512,
8 layers) and the same prompts (the demo data's ``synthetic/color`` rows, images at
vlreason's pixel budget), each loop samples G completions per prompt under the same
per-prompt seeds, with the vision tower run once beforehand (as ``generate_completions``
does), and the time of the sampling call alone is taken:

* ``prefix`` — today's default (``vlreason/rollout/prefix.py``): the prompts prefilled once,
  their ``DynamicCache`` repeated G times, a Python loop of eager decode steps.
* ``prefix_static`` — the same prefill, then a ``StaticCache`` of ``prompt + max_new_tokens``
  slots holding the G copies, and a fixed-shape attention mask updated in place: every
  decode step has the same shapes (the precondition for compiling it or capturing it in a
  CUDA graph), run eagerly.
* ``prefix_static_compiled`` — the same with the decode step under ``torch.compile``
  (inductor; ``--compile-mode``, e.g. ``reduce-overhead`` for CUDA graphs on a GPU). The first
  call compiles: its time is reported apart (``compile_s``) and left out of tokens/s.
* ``generate`` — HF ``generate`` on the G copies of each prompt (vlreason's reference path,
  ``rollout.share_prefix=false``).
* transformers' continuous batching (``model.generate_batch``, paged attention): not run. Its
  requests are token-id lists only (no ``pixel_values`` / image embeddings), so it cannot
  run an image prompt of a VLM; the report says so.

Per loop: the median over ``--rounds`` rounds (loops interleaved, the order reversed every
other round) of the sampling time, generated tokens (all P x G rows to their end or to
``max_new_tokens``), tokens/s, and whether its tokens equal the ``prefix`` loop's under the
same seeds (kernels that change the float rounding may change a sampled token; the
equality is reported, not assumed). Output: ``benchmarks/results_decode_loops.json`` and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

DEFAULT_OUT = HERE / "results_decode_loops.json"
LOOPS = ("prefix", "prefix_static", "prefix_static_compiled", "generate")
CONTINUOUS_BATCHING = ("not run: transformers' continuous batching (generate_batch / init_continuous_batching) "
                       "takes token-id lists only, no pixel_values or image embeddings, so it cannot sample "
                       "from an image prompt of a VLM")


# ---------------------------------------------------------------------------- the static-cache loop


def static_cache_from(model, cache, repeats: int, max_len: int):
    """A ``StaticCache`` of ``max_len`` slots holding ``cache``'s prompt keys / values, each
    prompt's repeated ``repeats`` times along the batch (prompt-major)."""
    from transformers import StaticCache

    static = StaticCache(config=model.config, max_cache_len=max_len)
    for layer, source in zip(static.layers, cache.layers):
        layer.update(source.keys.repeat_interleave(repeats, dim=0), source.values.repeat_interleave(repeats, dim=0))
    return static


class StaticDecoder:
    """Decode steps of fixed shapes over a ``StaticCache``: tokens [N], the attention mask [N, L]
    (prompt + max_new_tokens slots, written in place), positions [R, N]. ``compile`` puts the
    step (language model + output layer) under ``torch.compile``."""

    def __init__(self, model, family, compile_mode: str | None = None):
        import torch

        self.model, self.family = model, family
        self.step = self._step
        if compile_mode is not None:
            self.step = torch.compile(self._step, mode=None if compile_mode == "default" else compile_mode,
                                      dynamic=False, fullgraph=False)

    def _step(self, tokens_N, attention_mask_NL, position_RN, cache):
        out = self.family.core(self.model)(
            input_ids=tokens_N[:, None],
            attention_mask=attention_mask_NL,
            position_ids=self.family.model_positions(position_RN[:, :, None]),
            cache=cache,
            use_cache=True,
        )
        return self.family.lm_head(self.model)(out.last_hidden_state[:, -1])


def sample_static(model, family, prompts, encoded, settings, decoder: StaticDecoder):
    """``prefix.sample_with_shared_prefix`` over a static cache: the same prefill, processors,
    per-prompt generators and stopping rule, so the same tokens wherever the logits are equal."""
    import torch

    from vlreason.rollout.prefix import logits_processors, next_tokens, prefill, prompt_generators

    with torch.no_grad():
        G, new = settings.num_generations, settings.max_new_tokens
        start = prefill(model, family, prompts, encoded)
        T = prompts.input_ids_PT.shape[1]
        cache = static_cache_from(model, start.cache, G, T + new)
        logits = start.logits_PV.repeat_interleave(G, dim=0)
        position = start.next_position_RP.repeat_interleave(G, dim=1)
        N = logits.shape[0]
        attention_mask = torch.zeros(N, T + new, dtype=prompts.attention_mask_PT.dtype, device=logits.device)
        attention_mask[:, :T] = prompts.attention_mask_PT.repeat_interleave(G, dim=0)
        processors = logits_processors(settings, logits.device)
        generators = prompt_generators(settings, prompts.num_prompts, logits.device)
        end_ids = torch.tensor(settings.end_ids, device=logits.device)
        unfinished = torch.ones(N, dtype=torch.bool, device=logits.device)
        generated = logits.new_empty(N, 0, dtype=torch.long)
        for step in range(new):
            scores = processors(generated, logits.float())
            tokens = next_tokens(scores, generators, G).masked_fill(~unfinished, settings.pad_id)
            generated = torch.cat([generated, tokens[:, None]], dim=1)
            unfinished &= ~torch.isin(tokens, end_ids)
            if not unfinished.any() or step + 1 == new:
                break
            attention_mask[:, T + step] = 1
            logits = decoder.step(tokens, attention_mask, position + step, cache).clone()
        return generated


# ---------------------------------------------------------------------------- measuring


def setup(args: argparse.Namespace):
    """Policy (model, family, processor) of the size, the prompts, their encoded images and the decode settings."""
    import torch
    from bench_common import Settings, color_rows, size_spec

    from vlreason.models.loading import ModelConfig
    from vlreason.models.tiny import tiny_model_path
    from vlreason.rollout.batch import RolloutBatch
    from vlreason.rollout.forward import encode_prompt_images
    from vlreason.rollout.generate import prompt_seeds
    from vlreason.rollout.policy import Policy, RolloutConfig
    from vlreason.rollout.prefix import DecodeSettings

    settings = Settings(size=args.size)
    path = tiny_model_path(size_spec(args.size))
    rollout = RolloutConfig(num_generations=args.num_generations, max_new_tokens=args.max_new_tokens,
                            min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
    policy = Policy.load(ModelConfig(name_or_path=str(path)), rollout)
    policy.model.eval()
    rows = [dict(r) for r in color_rows(settings).select(range(args.prompts))]
    prompts = policy.prompts(rows)
    P, G = prompts.num_prompts, args.num_generations
    stub = RolloutBatch(prompts=prompts, group_ids_N=torch.arange(P).repeat_interleave(G),
                        completion_ids_NT=torch.empty(P * G, 0, dtype=torch.long),
                        completion_mask_NT=torch.empty(P * G, 0, dtype=torch.long),
                        truncated_N=torch.zeros(P * G, dtype=torch.bool))
    with torch.no_grad():
        encoded, _ = encode_prompt_images(policy.model, policy.family, stub, list(range(P)))
    tok = policy.processor.tokenizer
    decode = DecodeSettings(num_generations=G, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0,
                            top_k=0, suppress_ids=policy.family.suppress_ids(tok),
                            end_ids=policy.family.end_ids(tok), pad_id=tok.pad_token_id,
                            prompt_seeds=prompt_seeds(args.seed, P))
    return policy, prompts, encoded, decode, str(path)


def loop_functions(policy, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from vlreason.rollout.generate import sample_with_generate
    from vlreason.rollout.prefix import sample_with_shared_prefix

    model, family = policy.model, policy.family
    eager = StaticDecoder(model, family)
    compiled = StaticDecoder(model, family, compile_mode=args.compile_mode)

    def generate(prompts, encoded, settings):
        with torch.random.fork_rng(devices=[]):  # generate reseeds the global RNG
            return sample_with_generate(model, family, prompts, encoded, settings)

    return {
        "prefix": lambda p, e, s: sample_with_shared_prefix(model, family, p, e, s),
        "prefix_static": lambda p, e, s: sample_static(model, family, p, e, s, eager),
        "prefix_static_compiled": lambda p, e, s: sample_static(model, family, p, e, s, compiled),
        "generate": generate,
    }


def generated_tokens(ids, settings) -> int:
    """Tokens the loop generated: every row up to and including its end token (or all steps)."""
    from vlreason.rollout.generate import completion_masks

    _, mask, _ = completion_masks(ids, settings.end_ids, settings.pad_id)
    return int(mask.sum())


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    policy, prompts, encoded, settings, path = setup(args)
    fns = loop_functions(policy, args)
    loops = [name for name in LOOPS if name in args.loops]
    out: dict[str, dict[str, Any]] = {name: {"seconds": [], "tokens": None, "steps": None} for name in loops}
    reference = None
    # first calls: compile (timed apart), warm-up of the others, and the tokens each loop draws
    first = {}
    for name in loops:
        start = time.perf_counter()
        ids = fns[name](prompts, encoded, settings)
        out[name]["first_call_s"] = time.perf_counter() - start
        first[name] = ids
    reference = first.get("prefix")
    for name in loops:
        ids = first[name]
        out[name]["tokens"] = generated_tokens(ids, settings)
        out[name]["steps"] = int(ids.shape[1])
        if reference is not None:
            same_shape = ids.shape == reference.shape
            out[name]["tokens_equal_prefix"] = bool(same_shape and torch.equal(ids, reference))
            width = min(ids.shape[1], reference.shape[1])
            out[name]["token_agreement_with_prefix"] = float((ids[:, :width] == reference[:, :width]).float().mean())
    for r in range(args.rounds):
        for name in (loops if r % 2 == 0 else loops[::-1]):
            start = time.perf_counter()
            fns[name](prompts, encoded, settings)
            out[name]["seconds"].append(time.perf_counter() - start)
            print(f"  round {r + 1}/{args.rounds} {name}: {out[name]['seconds'][-1]:.2f} s", flush=True)
    for name in loops:
        entry = out[name]
        entry["seconds_median"] = statistics.median(entry["seconds"])
        entry["tokens_per_s"] = entry["tokens"] / entry["seconds_median"]
        if name == "prefix_static_compiled":
            entry["compile_s"] = entry["first_call_s"] - entry["seconds_median"]
    base = out.get("prefix", {}).get("tokens_per_s")
    for name in loops:
        out[name]["speedup_vs_prefix"] = out[name]["tokens_per_s"] / base if base else None
    fastest = max(loops, key=lambda n: out[n]["tokens_per_s"])
    return {"model_path": path, "prompts": prompts.num_prompts, "prompt_tokens": int(prompts.input_ids_PT.shape[1]),
            "loops": out, "fastest": fastest, "continuous_batching": CONTINUOUS_BATCHING}


def print_table(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(f"\n{s['size']}: {report['prompts']} prompts x G={s['num_generations']}, up to {s['max_new_tokens']} new "
          f"tokens, prompt {report['prompt_tokens']} tokens, {s['threads']} torch thread(s), load before "
          f"{report['load_before'][0]:.1f}, after {report['load_after'][0]:.1f}")
    header = f"{'loop':<26}{'median s':>10}{'tokens':>8}{'tokens/s':>10}{'vs prefix':>10}{'first call s':>14}  same tokens"
    print(header)
    print("-" * len(header))
    for name, e in report["loops"].items():
        same = e.get("tokens_equal_prefix")
        agree = e.get("token_agreement_with_prefix")
        print(f"{name:<26}{e['seconds_median']:>10.2f}{e['tokens']:>8}{e['tokens_per_s']:>10.1f}"
              f"{e['speedup_vs_prefix']:>9.2f}x{e['first_call_s']:>14.2f}  "
              f"{'yes' if same else 'no'}{'' if same or agree is None else f' ({agree:.1%} of positions)'}")
    print(f"{'continuous batching':<26}{report['continuous_batching']}")
    print(f"fastest measured: {report['fastest']}")


def main(argv: list[str] | None = None) -> int:
    from bench_common import SIZES
    from vs_trl_report import source_tree, versions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="mid", choices=list(SIZES))
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--num-generations", "-G", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per loop (after one untimed first call)")
    parser.add_argument("--loops", nargs="+", default=list(LOOPS), choices=LOOPS)
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of the compiled decode step (default; reduce-overhead: CUDA graphs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    load_before = os.getloadavg()
    result = run(args)
    report = {
        "benchmark": "rollout decode loops (benchmarks/decode_loops.py)",
        "command": "python benchmarks/decode_loops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": versions(),
        "source_tree": source_tree(),
        "settings": {"size": args.size, "num_generations": args.num_generations, "max_new_tokens": args.max_new_tokens,
                     "rounds": args.rounds, "threads": args.threads, "compile_mode": args.compile_mode,
                     "seed": args.seed},
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
        **result,
    }
    Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    print_table(report)
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
