"""benchmarks/vs_trl.py's pieces: the fair TRL patch, the mid size and its FLOP split, the
report's fair / unpatched comparisons. Fast: no benchmark run, no checkpoint on disk."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_common  # noqa: E402
import trl_side  # noqa: E402
import vs_trl_report  # noqa: E402

# ---------------------------------------------------------------------------- the fair patch


class FakeTrainer:
    """What apply_fair_patch touches on a GRPOTrainer."""

    def __init__(self, entropy_coef: float = 0.0, top_entropy_quantile: float = 1.0):
        self.model = SimpleNamespace(forward="fused forward with entropy")  # instance forward, as TRL sets it
        self.temperature = 0.7
        self.args = SimpleNamespace(cast_lm_head_to_fp32=False)
        self._entropy_bonus_enabled = entropy_coef != 0.0
        self.top_entropy_quantile = top_entropy_quantile
        self.calls: list[dict] = []
        self._get_per_token_logps_and_entropies = self._logps

    def _logps(self, model, input_ids, compute_entropy=False, **kwargs):
        self.calls.append({"compute_entropy": compute_entropy, **kwargs})
        logps = torch.full((2, 3), -1.5)
        return logps, (torch.ones_like(logps) if compute_entropy else None), None


def fake_trl_utils():
    calls = []

    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        calls.append({"had_instance_forward": "forward" in vars(model), "temperature": temperature,
                      "cast": cast_lm_head_to_fp32, "outputs": outputs})
        model.forward = f"fused forward {outputs}"

    return SimpleNamespace(_use_triton=lambda device: device.type == "cuda", add_fused_lm_head=add_fused_lm_head,
                           calls=calls)


def test_fair_patch_scores_completions_only_and_drops_the_entropy():
    trainer, utils = FakeTrainer(), fake_trl_utils()
    changes = trl_side.apply_fair_patch(trainer, utils)
    assert changes == list(trl_side.FAIR_PATCH)
    # (1) the fused head's compact path (completion positions only) on any device, CPU included
    assert utils._use_triton(torch.device("cpu")) is True
    # (2) the policy head re-added from the class forward, log-probs only, same temperature and cast
    assert utils.calls == [{"had_instance_forward": False, "temperature": 0.7, "cast": False,
                            "outputs": ("log_probs",)}]
    # ... and the loss's call (compute_entropy=True) computes none; zeros stand in for the metric
    logps, entropies, aux = trainer._get_per_token_logps_and_entropies("model", "ids", compute_entropy=True,
                                                                      pixel_values="px")
    assert trainer.calls == [{"compute_entropy": False, "pixel_values": "px"}]
    assert torch.equal(entropies, torch.zeros_like(logps)) and aux is None
    # the reference pass (no entropy asked) is passed through as it was
    assert trainer._get_per_token_logps_and_entropies("ref", "ids")[1] is None


@pytest.mark.parametrize("kwargs", [{"entropy_coef": 0.01}, {"top_entropy_quantile": 0.2}])
def test_fair_patch_refuses_when_the_entropy_feeds_the_loss(kwargs):
    utils = fake_trl_utils()
    with pytest.raises(ValueError, match="feeds TRL's loss"):
        trl_side.apply_fair_patch(FakeTrainer(**kwargs), utils)
    assert utils.calls == [] and utils._use_triton(torch.device("cpu")) is False


def test_fair_patch_on_trls_own_fused_head(monkeypatch):
    """With TRL installed: the patched fused head projects only the completion positions and
    gives the same log-probs there as TRL's CPU path, which projects every position."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)  # restored after the test
    torch.manual_seed(0)
    hidden, vocab = 16, 50
    body = torch.nn.Linear(hidden, hidden)

    class Tiny(torch.nn.Module):  # the layout add_fused_lm_head reads: config, base_model, output embeddings
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(get_text_config=lambda: self.config, model_type="tiny")
            self.body, self.head = body, torch.nn.Linear(hidden, vocab, bias=False)
            self.embed = torch.nn.Embedding(vocab, hidden)

        @property
        def base_model(self):
            return lambda input_ids, **kw: SimpleNamespace(last_hidden_state=self.body(self.embed(input_ids)))

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, **kwargs):
            raise AssertionError("the fused path is the one under test")

    rows_projected = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda h, *a: rows_projected.append(h.shape[0]) or apply(h, *a))
    ids = torch.randint(0, vocab, (2, 9))
    labels = ids.clone()
    labels[:, :6] = -100  # 6 prompt positions, 3 completion tokens per row

    model = Tiny()
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    full = model(input_ids=ids, labels=labels, fused_lm_head=True)
    trainer = SimpleNamespace(model=model, temperature=1.0, args=SimpleNamespace(cast_lm_head_to_fp32=False),
                              _get_per_token_logps_and_entropies=None)
    trl_side.apply_fair_patch(trainer, trl_utils)
    fair = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert rows_projected == [2 * 8, 2 * 3]  # every shifted position, then the completion tokens only
    assert full.entropy is not None and fair.entropy is None
    assert torch.allclose(full.log_probs[:, -3:], fair.log_probs[:, -3:], atol=1e-6)


# ---------------------------------------------------------------------------- the mid size


def meta_model(size: str):
    """The size's Qwen2.5-VL on the meta device (config only: no weights, no tokenizer)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlreason.models.tiny_builders import qwen2_5_vl_config

    ids = {name: i for i, name in enumerate(["<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                              "<|vision_start|>", "<|vision_end|>"])}
    config = qwen2_5_vl_config(bench_common.size_spec(size), ids)
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration._from_config(config)


def test_mid_size_is_the_representative_shape():
    spec = bench_common.size_spec("mid")
    assert (spec.vocab_size, spec.text_hidden, spec.text_layers, spec.vision_depth) == (151_936, 512, 8, 4)
    assert spec.text_hidden % spec.text_heads == 0 and spec.text_heads % spec.text_kv_heads == 0
    assert bench_common.size_spec("tiny") == type(spec)()  # tiny is TinySpec's defaults
    assert set(bench_common.DEFAULT_STEPS) == set(bench_common.SIZES)
    with pytest.raises(ValueError, match="unknown size"):
        bench_common.size_spec("huge")


def test_mid_update_is_dominated_by_the_layers_vocab_by_the_output_layer():
    # the step's shape: 34 prompt tokens (16 image tokens), 32 completion tokens, 64 patches per image
    mid = bench_common.flop_split(meta_model("mid"), 34, 32, 64)
    vocab = bench_common.flop_split(meta_model("vocab"), 34, 32, 64)
    assert mid["update_share"]["text_layers_and_attention"] > 0.55 > mid["update_share"]["output_layer"]
    assert vocab["update_share"]["output_layer"] > 0.9
    assert sum(mid["update_share"].values()) == pytest.approx(1.0)
    per_row = mid["update_flops_per_row"]
    assert per_row["output_layer"] == 3 * 2 * 512 * 151_936 * 32  # completion positions only, fwd + bwd
    assert mid["decode_token_flops"]["output_layer"] == 2 * 512 * 151_936


# ---------------------------------------------------------------------------- the report


def side(step_s: float, step_rss: float, images: int = 2, mode: str | None = None) -> dict:
    vision = {p: {"calls": 1, "images": images, "patch_rows": 64 * images} for p in ("generation", "reference",
                                                                                      "policy")}
    out = {"step_s_median": step_s, "max_rss_mb": 1000 + step_rss, "step_rss_mb": step_rss,
           "rss_before_steps_mb": 1000, "rss_after_imports_mb": 900, "phases_s_median": {"rollout": 1.0},
           "vision_per_step": vision, "images_encoded_per_step": 3 * images, "vision_calls_per_step": 3,
           "image_processor_per_step": {"calls": 1, "images": images}, "completion_len_mean": 32.0}
    return {**out, "trl_mode": mode} if mode else out


def test_report_judges_goals_on_the_fair_run_and_keeps_the_unpatched_beside_it():
    settings = bench_common.Settings(size="mid", beta=0.04)
    result = vs_trl_report.build_result(settings, [side(4.0, 100)],
                                        {"fair": [side(10.0, 300, 16, "fair")],
                                         "unpatched": [side(16.0, 400, 16, "unpatched")]}, "never")
    assert result["headline_trl_mode"] == "fair"
    assert result["comparison"]["trl_mode"] == "fair"
    assert result["comparison"]["ratios"]["step_time"] == pytest.approx(0.4)
    assert result["comparison_unpatched"]["ratios"]["step_time"] == pytest.approx(0.25)
    goals = {g["goal"]: g for g in result["comparison"]["goals"]}
    mid_memory = goals["step memory (peak RSS above pre-step RSS) <= 0.5x TRL, mid"]
    assert mid_memory["ratio"] == pytest.approx(1 / 3, abs=1e-3) and mid_memory["met"] is True
    assert goals["step time <= 0.5x TRL"]["met"] is True
    assert goals["one encoding per distinct image per pass"]["met"] is True
    assert vs_trl_report.trl_sides(result).keys() == {"fair", "unpatched"}


def test_step_time_floor_is_our_update_over_their_whole_step():
    ours = {**side(4.0, 100), "phases_s_median": {"rollout": 1.0, "reference": 0.5, "reward": 0.1, "rest": 2.4}}
    theirs = side(5.0, 300, 16, "fair")
    assert vs_trl_report.update_floor(ours, theirs) == pytest.approx(0.5)
    result = vs_trl_report.build_result(bench_common.Settings(size="mid", beta=0.04), [ours], {"fair": [theirs]},
                                        "never")
    assert result["comparison"]["ratios"]["step_time_floor"] == pytest.approx(0.5)


def test_old_results_read_as_unpatched():
    old = {"trl": side(10.0, 300, 16)}  # written before the fair mode: TRL as installed
    assert list(vs_trl_report.trl_sides(old)) == ["unpatched"]
