"""Tiny random vision-language checkpoints of every family, built offline (``vlreason tiny-model``).

A tiny checkpoint is a real transformers checkpoint directory: a byte-level BPE
tokenizer trained here with ``tokenizers`` (Qwen chat special tokens plus the
reasoning tags), the family's real processor classes and a chat template, and a small
randomly initialised model of the family's real model class. It loads with
``AutoProcessor`` / ``AutoModelForImageTextToText`` like any hub checkpoint, so tests
and the demo run the same code paths a user's 7B checkpoint runs.

Builds are deterministic for a seed and cached under ``~/.cache/vlreason/tiny-models``
(``VLREASON_CACHE`` overrides the root), keyed by every argument and the builder
version, so tests and demos build each variant once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from vlreason.models.tiny_builders import BUILDERS, CHAT_TOKENS, get_builder

BUILDER_VERSION = 1

# Special tokens of the Qwen chat format, in the order Qwen assigns them.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Reasoning tags: added as whole tokens but not "special", so decoding keeps them.
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]


def chat_template(image: str = "<|vision_start|><|image_pad|><|vision_end|>",
                  video: str = "<|vision_start|><|video_pad|><|vision_end|>") -> str:
    """A Qwen-style chat template: system turn only when given, images and text in content
    order, `add_generation_prompt` opens the assistant turn; ``image`` / ``video`` are the
    family's placeholders (its processor expands them to the image tokens)."""
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}"
        "{{ message['content'] }}"
        "{%- else -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' or 'image' in part -%}"
        + _literal(image) +
        "{%- elif part['type'] == 'video' or 'video' in part -%}"
        + _literal(video) +
        "{%- elif part['type'] == 'text' -%}"
        "{{ part['text'] }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def _literal(text: str) -> str:
    """``text`` as template output: raw, or as an expression when it holds whitespace
    (the ``{%- -%}`` tags around it would strip that)."""
    return "{{ '" + text.replace("\n", "\\n") + "' }}" if text != text.strip() else text


# The Qwen families' template (also the tiny text reasoner's).
CHAT_TEMPLATE = chat_template()

FAMILIES = tuple(BUILDERS)


@dataclass(frozen=True)
class TinySpec:
    """Every knob of a tiny checkpoint; the cache key is derived from all of them."""

    family: str = "qwen2_5_vl"
    vocab_size: int = 1024
    seed: int = 0
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 128
    vision_hidden: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    vision_mlp: int = 64
    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 224

    def cache_key(self) -> str:
        revision = BUILDERS[self.family].revision if self.family in BUILDERS else 0
        blob = json.dumps({**asdict(self), "builder": BUILDER_VERSION, **({"family_rev": revision} if revision else {})},
                          sort_keys=True)
        return f"{self.family}-v{self.vocab_size}-s{self.seed}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` to fill; on success it replaces
    ``out_dir`` in one rename, on any error it is removed (no half-written checkpoint)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_root() -> Path:
    return Path(os.environ.get("VLREASON_CACHE", Path.home() / ".cache" / "vlreason")) / "tiny-models"


def family_available(family: str) -> tuple[bool, str]:
    """Whether the installed transformers has this family (Qwen3-VL is newer)."""
    from vlreason.models.families import get_family

    try:
        get_family(family).model_class()
    except (ImportError, AttributeError) as err:
        return False, f"the installed transformers has no {family} support ({err})"
    return True, ""


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: chat scaffolding, reasoning tags, task words."""
    words = (
        "what how many is the a an of in on image picture shape shapes colour color "
        "red green blue yellow orange purple black white gray circle circles square squares "
        "triangle triangles star marker small large count there are i see first then so "
        "answer question choose option options which one select letter think step look "
        "at find the number total objects object left right top bottom middle corner "
        "zero one two three four five six seven eight nine ten yes no true false "
        "describe caption solution because therefore final"
    ).split()
    rng = random.Random(1234)
    lines = []
    for _ in range(3000):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        lines.append(sentence.capitalize() + rng.choice(["?", ".", ":", "!"]))
    for i in range(0, 1000):
        lines.append(f"{i} {i / 4:.2f} ({chr(65 + i % 4)}) [{i}, {i + 3}, {i * 2}, {i + 7}] {i}%")
    lines += ["<think>I count the shapes.</think><answer>3</answer>"] * 20
    lines += ["system user assistant\n"] * 20
    return lines


def build_tokenizer(vocab_size: int, family: str | None = None):
    """A byte-level BPE tokenizer with the chat specials, the family's vision tokens (the
    Qwen ones by default) and the reasoning tags."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, named = SPECIAL_TOKENS, {}
    if family is not None:
        builder = get_builder(family)
        specials, named = [*CHAT_TOKENS, *builder.vision_tokens], dict(builder.named_tokens)
    bpe_vocab = min(vocab_size, 1024) - len(specials) - len(REASONING_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(specials),
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        **named,  # named vision tokens some processors read (InternVL's start_image_token, ...)
    )
    fast.add_tokens(REASONING_TOKENS, special_tokens=False)
    fast.padding_side = "left"
    return fast


def build_tiny_model(out_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a tiny checkpoint for ``spec`` into ``out_dir`` (atomically) and return it."""
    import torch

    from vlreason.models.families import get_family

    ok, why = family_available(spec.family)
    if not ok:
        raise RuntimeError(f"cannot build a tiny {spec.family} model: {why}")
    family = get_family(spec.family)
    builder = get_builder(spec.family)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        tokenizer = build_tokenizer(spec.vocab_size, spec.family)
        if len(tokenizer) > spec.vocab_size:
            raise ValueError(f"--vocab-size {spec.vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*CHAT_TOKENS, *builder.vision_tokens)}
        config = builder.config(spec, ids)
        torch.manual_seed(spec.seed)
        model = family.model_class()(config)
        if builder.adjust is not None:
            builder.adjust(model)
        model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        model.generation_config.pad_token_id = ids["<|endoftext|>"]
        model.generation_config.do_sample = False
        template = chat_template(builder.image_placeholder, builder.video_placeholder)
        processor = builder.processor(tokenizer, spec, template)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "vlreason_tiny.json").write_text(json.dumps(asdict(spec), indent=2, sort_keys=True))
    return out_dir


def tiny_model_path(spec: TinySpec = TinySpec(), **overrides) -> Path:
    """The cached tiny checkpoint for ``spec`` (built on first use)."""
    if overrides:
        spec = TinySpec(**{**asdict(spec), **overrides})
    path = cache_root() / spec.cache_key()
    if not (path / "vlreason_tiny.json").is_file():
        build_tiny_model(path, spec)
    return path
