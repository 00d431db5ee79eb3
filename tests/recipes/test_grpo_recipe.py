"""The GRPO recipe through its real entry points: run directory contents, trainable
parameters change, SIGTERM + resume gives the same weights, bad input is handled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlreason.cli import main

FAST = ["max_steps=4", "rollout.num_generations=4", "rollout.max_new_tokens=40",
        "prompts_per_step=2", "algorithm.micro_batch_prompts=1", "optim.lr=1e-3",
        "heldout_eval=false"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_grpo_run_directory_contents_and_trainable_weights_change(tmp_path):
    # what it checks: the run directory (config, metrics keys, checkpoints, TensorBoard events,
    # loadable final/, curves) and that every trainable tensor moved. Not learning: with 4
    # steps at lr 1e-3 the logged reward may fall; the learning check lives elsewhere.
    run = tmp_path / "run"
    assert main(["train", "grpo", f"output_dir={run}", "save_steps=2", "algorithm.kl_coef=0.01", *FAST]) == 0
    assert (run / "config.yaml").is_file()
    records = _metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "reward", "kl", "completion_len", "truncated_frac", "time/rollout",
                "time/reward", "time/reference", "time/update", "grad_norm"):
        assert key in records[-1], key
    assert all(r["loss"] is not None for r in records)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step-2", "step-4"]
    assert list(run.glob("events.out.tfevents*"))
    # final/ loads with from_pretrained, and training changed every trainable tensor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlreason.paths import warm_model

    AutoModelForImageTextToText.from_pretrained(run / "final")
    AutoProcessor.from_pretrained(run / "final")
    base = load_file(str(warm_model() / "model.safetensors"))  # the recipe's default start
    final = load_file(str(run / "final" / "model.safetensors"))
    assert final.keys() == base.keys()
    unchanged = [n for n in base if torch.equal(final[n], base[n])]
    assert not unchanged, f"trainable tensors that did not change: {unchanged}"
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 10_000


def test_fresh_run_into_an_earlier_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    args = [f"output_dir={run}", "max_steps=1", "rollout.num_generations=2", "rollout.max_new_tokens=4",
            "prompts_per_step=1", "algorithm.micro_batch_prompts=1", "heldout_eval=false"]
    assert main(["train", "grpo", *args]) == 0
    assert main(["train", "grpo", *args]) == 2
    assert "pass resume=auto to continue it, overwrite=true to start over" in capsys.readouterr().err
    (run / "marker").write_text("old")
    assert main(["train", "grpo", *args, "overwrite=true"]) == 0
    assert not (run / "marker").exists()


def test_unknown_override_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "grpo", f"output_dir={tmp_path}", "rollout.num_generation=2"]) == 2
    assert "Did you mean 'num_generations'" in capsys.readouterr().err


def _run_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlreason", "train", "grpo", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_then_resume_matches_uninterrupted_run(tmp_path):
    args = ["max_steps=6", "rollout.num_generations=4", "rollout.max_new_tokens=40",
            "prompts_per_step=2", "algorithm.micro_batch_prompts=1", "optim.lr=1e-3",
            "optim.schedule=cosine", "optim.warmup_steps=2", "algorithm.kl_coef=0.01",
            "heldout_eval=false"]
    straight = tmp_path / "straight"
    assert main(["train", "grpo", f"output_dir={straight}", *args]) == 0

    run = tmp_path / "interrupted"
    proc = _run_cli([f"output_dir={run}", *args])
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until two steps are logged, then SIGTERM
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    stopped_at = len(_metrics(run))
    assert stopped_at < 6, "the run finished before the signal; make it longer"
    assert (run / "checkpoints" / f"step-{stopped_at}").is_dir()

    assert main(["train", "grpo", f"output_dir={run}", "resume=auto", *args]) == 0
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    from vlreason.paths import warm_model

    start = load_file(str(warm_model() / "model.safetensors"))
    assert any(not torch.equal(a[n], start[n]) for n in a), "training did not move the weights"
    for name in a:  # same seed, same data order, same samples: equal to float rounding
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)
    steps = [r["step"] for r in _metrics(run)]
    assert steps == [1, 2, 3, 4, 5, 6], "metrics.jsonl has gaps or duplicates after resume"
    ra = [r["reward"] for r in _metrics(straight)]
    rb = [r["reward"] for r in _metrics(run)]
    assert ra == rb


def test_grpo_with_lora_saves_an_adapter(tmp_path):
    run = tmp_path / "run"
    args = [a for a in FAST if not a.startswith("max_steps")]
    assert main(["train", "grpo", f"output_dir={run}", "max_steps=2", "model.lora.enabled=true",
                 "model.lora.r=4", "algorithm.kl_coef=0.01", *args]) == 0
    assert (run / "final" / "adapter_config.json").is_file()
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlreason.paths import warm_model

    base = AutoModelForImageTextToText.from_pretrained(warm_model())
    PeftModel.from_pretrained(base, run / "final")
    saved = load_file(str(run / "checkpoints" / "step-2" / "model.safetensors"))
    assert saved and all("lora_" in name for name in saved)  # checkpoints hold only the adapter


def test_dapo_options_and_two_updates_per_rollout_through_the_recipe(tmp_path):
    # what it checks: the algorithm.* DAPO keys reach the GRPO step of the real recipe (tiny
    # model): dynamic sampling logs its rounds and keeps exactly prompts_per_step informative
    # groups (or says it fell short), the overlong penalty is in the rewards, and with
    # updates_per_rollout=2 the second step reuses the rollout with an active ratio.
    run = tmp_path / "run"
    args = [a for a in FAST if not a.startswith(("max_steps", "rollout.max_new_tokens"))]
    assert main(["train", "grpo", f"output_dir={run}", "max_steps=2", "rollout.max_new_tokens=24",
                 "algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling_max_rounds=3",
                 "algorithm.overlong_cache=8",
                 "algorithm.updates_per_rollout=2", "optim.lr=3e-3", *args]) == 0
    first, second = _metrics(run)
    rounds = first["dapo/rounds"]
    assert 1 <= rounds <= 3 and first["dapo/sampled_groups"] == 2 * rounds
    informative = first["dapo/sampled_groups"] - first["dapo/dropped_groups"]
    assert first["dapo/kept_groups"] == min(2, informative)
    assert first["dapo/short"] == float(informative < 2)
    assert -1.0 <= first["reward/overlong"] <= 0.0
    # update 1 trains at the rollout weights: ratio exactly 1; update 2 reuses the rollout
    # (nothing sampled: no rollout time) with logp_old from the rollout, so the ratio moved
    assert first["ratio_mean"] == 1.0 and first["ratio_max"] == 1.0 and first["rollout/reused"] == 0
    assert second["rollout/reused"] == 1 and "time/rollout" not in second and "dapo/rounds" not in second
    assert second["reward"] == first["reward"]
    assert second["ratio_mean"] != 1.0 and second["approx_kl"] > 0


def test_dapo_paper_config_carries_dapos_numbers_and_a_source_on_every_value():
    from recipes.grpo import GRPORecipeConfig
    from vlreason.config import load_config

    path = Path(__file__).parents[2] / "recipes" / "configs" / "grpo_dapo_paper.yaml"
    cfg = load_config(GRPORecipeConfig, path)
    a = cfg.algorithm
    assert (a.clip_low, a.clip_high, a.kl_coef, a.aggregation) == (0.2, 0.28, 0.0, "token-mean")
    assert (a.dynamic_sampling, a.overlong_cache, cfg.rollout.max_new_tokens) == (True, 4096, 20480)
    # 512 prompts x 16 responses a rollout, 16 updates of 32 prompts
    assert (cfg.prompts_per_step * a.mini_batches, cfg.rollout.num_generations, a.updates_per_rollout) == (512, 16, 16)
    assert cfg.optim.lr == 1e-6 and cfg.save_steps % a.updates_per_rollout == 0
    for line in path.read_text().splitlines():  # every number and switch names its source
        key, _, value = line.split("#")[0].partition(":")
        value = value.strip()
        if value in ("true", "false") or value.replace(".", "").replace("e-", "").isdigit():
            assert "[" in line.partition("#")[2], f"no source: {line}"
