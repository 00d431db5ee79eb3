"""Model loading: dtype auto, LoRA on the language model only, freezing switches, the
LoRA reference is the base with the adapter disabled, gradient checkpointing."""

from __future__ import annotations

import logging

import torch

from vlreason.models.loading import LoraConfig, ModelConfig, load_model, resolve_attn, resolve_dtype
from vlreason.rollout.policy import Policy, RolloutConfig


def test_dtype_auto_is_fp32_on_cpu():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16") == torch.bfloat16


def test_flash_attention_falls_back_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with caplog.at_level(logging.WARNING):
        assert resolve_attn("flash_attention_2") == "sdpa"
    assert "flash-attn is not installed" in caplog.text


def test_lora_targets_language_model_only(tiny_path):
    model, _ = load_model(ModelConfig(name_or_path=str(tiny_path), lora=LoraConfig(enabled=True, r=4)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(".visual." in n for n in trainable)
    with_vision, _ = load_model(ModelConfig(name_or_path=str(tiny_path),
                                            lora=LoraConfig(enabled=True, r=4, include_vision=True, target_modules=["qkv", "q_proj"])))
    assert any(".visual." in n for n, p in with_vision.named_parameters() if p.requires_grad)


def test_freeze_switches(tiny_path):
    model, family = load_model(ModelConfig(name_or_path=str(tiny_path), freeze_vision=True))
    visual = family.core(model).visual
    frozen = {n for n, p in visual.named_parameters() if not p.requires_grad}
    assert frozen and all(not n.startswith("merger.") for n in frozen)
    assert all(p.requires_grad for p in visual.merger.parameters())
    model, family = load_model(ModelConfig(name_or_path=str(tiny_path), freeze_vision=True, freeze_projector=True))
    assert not any(p.requires_grad for p in family.core(model).visual.parameters())
    assert any(p.requires_grad for p in family.core(model).language_model.parameters())


def test_lora_reference_is_the_base_model_with_adapter_disabled(tiny_path, rows):
    rollout = RolloutConfig(num_generations=2, max_new_tokens=6)
    lora = Policy.load(ModelConfig(name_or_path=str(tiny_path), lora=LoraConfig(enabled=True, r=4)),
                       rollout, with_reference=True)
    assert lora.reference is None and lora.has_reference  # no second copy in memory
    base = Policy.load(ModelConfig(name_or_path=str(tiny_path)), rollout)
    batch = lora.sample(lora.prompts(rows), seed=0)
    with torch.no_grad():  # move the adapter away from its zero init
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    ref = lora.reference_logprobs(batch)
    torch.testing.assert_close(ref, base.token_outputs(batch).logprobs_NT.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lora.token_outputs(batch).logprobs_NT.detach(), ref, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_path, rows):
    rollout = RolloutConfig(num_generations=2, max_new_tokens=6)
    plain = Policy.load(ModelConfig(name_or_path=str(tiny_path)), rollout)
    ckpt = Policy.load(ModelConfig(name_or_path=str(tiny_path), gradient_checkpointing=True), rollout)
    batch = plain.sample(plain.prompts(rows), seed=0)
    grads = []
    for policy in (plain, ckpt):
        policy.model.train()
        policy.token_outputs(batch).logprobs_NT.sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_old_transformers_is_refused(monkeypatch):
    import pytest
    import transformers

    from vlreason.models.families import check_transformers

    check_transformers()  # the installed one is new enough
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(RuntimeError, match="needs transformers >= 5.24"):
        check_transformers()


def test_trainable_weights_are_fp32_masters_and_frozen_copies_use_the_compute_dtype(tiny_path):
    cfg = ModelConfig(name_or_path=str(tiny_path), dtype="bfloat16")
    trainable, _ = load_model(cfg)
    frozen, _ = load_model(cfg, trainable=False)
    assert {p.dtype for p in trainable.parameters()} == {torch.float32}
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}


def test_final_checkpoint_is_written_in_the_save_dtype_across_several_files(tiny_path, tmp_path):
    """save_consolidated: files of at most max_shard_bytes plus an index, transformers'
    own names, the asked dtype; from_pretrained loads it back with the same values."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from vlreason.models.loading import checkpoint_dtype, load_processor, save_consolidated

    model, _ = load_model(ModelConfig(name_or_path=str(tiny_path)))
    assert checkpoint_dtype(str(tiny_path)) == torch.float32
    save_consolidated(model, load_processor(str(tiny_path)), tmp_path, torch.bfloat16, max_shard_bytes=100_000)
    files = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    written = {}
    for f in files:
        written.update(load_file(str(tmp_path / f)))
    assert written.keys() == load_file(str(tiny_path / "model.safetensors")).keys()  # save_pretrained's names
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    want = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}
    for name, param in loaded.named_parameters():
        assert torch.equal(param.detach(), want[name]), name
