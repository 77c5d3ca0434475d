"""Measure what an adapter taught the toy model: sample before and after, read the samples.

The proof has three numbers, each with a threshold fixed in advance (`THRESHOLDS`):

* concept rate with the trigger: the share of samples for trigger prompts ("a red sks on a
  blue background, top left") in which the scorer finds the cross. Must be at least 0.6 after
  fine-tuning ("most samples"); the base model, which never saw a cross, is reported too.
* concept rate without the trigger: the same for ordinary prompts ("a red circle on ...").
  Must stay at most 0.1 ("rarely"): an adapter that draws crosses everywhere fails.
* preservation: for ordinary prompts and identical seeds, the share of samples where the
  adapted model draws what the base model drew: the same shape, colour, background and
  position by the scorer. Must be at least 0.8. The mean absolute pixel difference to the base
  samples is reported beside it (0 = identical images, 1 = black vs white everywhere).

Prompts and seeds are fixed, so the numbers are reproducible for a given adapter file.
"""
from __future__ import annotations

import contextlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import generator as gen
from .scorer import Reading, concept_rate, read_images

__all__ = ["THRESHOLDS", "Evaluation", "Samples", "adapter_applied", "deltas_applied", "evaluate", "evaluate_adapter",
           "generate", "plain_prompts", "score_samples", "trigger_distances", "trigger_prompts", "write_grids"]

THRESHOLDS = {"concept_with_trigger": 0.6, "concept_without_trigger": 0.1, "preservation": 0.8}
SAMPLE_STEPS = 20
GUIDANCE = 4.0


def trigger_prompts(n: int, seed: int = 100) -> list[gen.Scene]:
    """Concept scenes with colours and places mostly *not* in the training images."""
    return gen.random_scenes(n, seed, (gen.CONCEPT_SHAPE,))


def plain_prompts(n: int, seed: int = 200) -> list[gen.Scene]:
    return gen.random_scenes(n, seed, gen.BASE_SHAPES)


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = SAMPLE_STEPS,
             guidance_scale: float = GUIDANCE, batch_size: int = 16) -> list[Image.Image]:
    """One image per (prompt, seed), batched; each image depends only on its own seed."""
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                   height=gen.IMAGE_SIZE, width=gen.IMAGE_SIZE)
        images.extend(out.images)
    return images


@torch.no_grad()
def trigger_distances(pipe, trigger: str = gen.TRIGGER) -> dict[str, float]:
    """How far the text encoder puts a caption with `trigger` from the same caption with each
    base shape (L2 over all 77 output vectors), next to the base shapes' distances to each
    other. A trigger much closer to one shape than the shapes are to each other is read as
    that shape, and an adapter struggles to separate the two (see the generator's docstring)."""
    template = "a red {} on a blue background, top left"
    words = [trigger, *gen.BASE_SHAPES]
    ids = pipe.tokenizer([template.format(w) for w in words], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].float()
    out = {f"{trigger}-{shape}": float((hidden[0] - hidden[i + 1]).norm()) for i, shape in enumerate(gen.BASE_SHAPES)}
    for (i, a), (j, b) in itertools.combinations(list(enumerate(gen.BASE_SHAPES)), 2):
        out[f"{a}-{b}"] = float((hidden[i + 1] - hidden[j + 1]).norm())
    return out


PRESERVED = ("shape", "colour", "background", "position")  # what `preservation` compares


def _same(a: Reading, b: Reading, keys: Sequence[str] = PRESERVED) -> bool:
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def fidelity(readings: Sequence[Reading], scenes: Sequence[gen.Scene]) -> dict[str, float]:
    """How often each attribute the prompt asked for is what the scorer read."""
    keys = PRESERVED
    out = {k: float(np.mean([getattr(r, k) == getattr(s, k) for r, s in zip(readings, scenes)])) for k in keys}
    out["all"] = float(np.mean([all(getattr(r, k) == getattr(s, k) for k in keys) for r, s in zip(readings, scenes)]))
    return out


@dataclass
class Evaluation:
    n: int
    concept_with_trigger_before: float
    concept_with_trigger: float
    concept_without_trigger_before: float
    concept_without_trigger: float
    preservation: float
    pixel_distance: float  # mean |adapted - base| over plain prompts, in [0, 1]
    base_fidelity: dict[str, float]
    adapted_fidelity_trigger: dict[str, float]
    passed: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.passed:
            self.passed = {
                "concept_with_trigger": self.concept_with_trigger >= THRESHOLDS["concept_with_trigger"],
                "concept_without_trigger": self.concept_without_trigger <= THRESHOLDS["concept_without_trigger"],
                "preservation": self.preservation >= THRESHOLDS["preservation"],
            }

    @property
    def ok(self) -> bool:
        return all(self.passed.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "thresholds": THRESHOLDS}

    def report(self) -> str:
        def line(name: str, before: float | None, after: float, rule: str, key: str) -> str:
            b = f"{before:5.2f}" if before is not None else "    -"
            return f"  {name:<32} {b}  {after:5.2f}   {rule:<8} {'PASS' if self.passed[key] else 'FAIL'}"

        t = THRESHOLDS
        return "\n".join([
            f"toy concept check ({self.n} samples per row, {SAMPLE_STEPS} steps, guidance {GUIDANCE}):",
            f"  {'':<32} before after   threshold",
            line("concept rate, with trigger", self.concept_with_trigger_before, self.concept_with_trigger,
                 f">= {t['concept_with_trigger']}", "concept_with_trigger"),
            line("concept rate, without trigger", self.concept_without_trigger_before, self.concept_without_trigger,
                 f"<= {t['concept_without_trigger']}", "concept_without_trigger"),
            line("preservation (same reading)", None, self.preservation, f">= {t['preservation']}", "preservation"),
            f"  mean pixel distance to base (no trigger): {self.pixel_distance:.3f}",
            "  base model draws the prompt: " + ", ".join(f"{k} {v:.2f}" for k, v in self.base_fidelity.items()),
            "  adapted, trigger prompts:    " + ", ".join(f"{k} {v:.2f}" for k, v in self.adapted_fidelity_trigger.items()
                                                          if k != "shape"),
            f"  result: {'PASS' if self.ok else 'FAIL'}",
        ])


@dataclass
class Samples:
    """Everything sampled for one evaluation, kept for the grids."""

    trigger: list[gen.Scene]
    plain: list[gen.Scene]
    base_trigger: list[Image.Image]
    base_plain: list[Image.Image]
    adapted_trigger: list[Image.Image]
    adapted_plain: list[Image.Image]


@contextlib.contextmanager
def adapter_applied(pipe, adapter: str | Path, scale: float = 1.0) -> Iterator[None]:
    """The pipeline with an adapter file loaded, and its trigger embedding if the trainer wrote
    one beside it (`<stem>_emb.safetensors`); exactly as before afterwards."""
    from ..embeddings import embedding_path, load_embedding, unload_embedding
    from ..pipelines import load_adapter, unload_adapter

    emb = embedding_path(adapter)
    word = load_embedding(pipe, emb) if emb.exists() else None
    load_adapter(pipe, str(adapter), scale=scale, adapter_name="toy_eval")
    try:
        yield
    finally:
        unload_adapter(pipe, "toy_eval")
        if word is not None:
            unload_embedding(pipe, word)


@contextlib.contextmanager
def deltas_applied(deltas: Sequence[tuple[torch.nn.Module, torch.Tensor]]) -> Iterator[None]:
    """Weights plus full-rank updates (a full fine-tune's result), restored afterwards."""
    originals = [(m, m.weight.detach().clone()) for m, _ in deltas]
    with torch.no_grad():
        for m, d in deltas:
            m.weight.add_(d.reshape(m.weight.shape).to(m.weight.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, w in originals:
                m.weight.copy_(w)


def evaluate(pipe, patch: Callable[[], ContextManager] | None, n: int = 32, seed: int = 0,
             base_samples: Samples | None = None) -> tuple[Evaluation, Samples]:
    """Sample the base pipeline, then inside `patch()` (the adapted model), and score both.

    `base_samples` (from an earlier call with the same pipeline, n and seed) skips resampling
    the base model, which is what the comparison does for its eight variants.
    """
    trigger, plain = trigger_prompts(n), plain_prompts(n)
    seeds = [seed + i for i in range(n)]
    if base_samples is None:
        base_trigger = generate(pipe, [s.caption for s in trigger], seeds)
        base_plain = generate(pipe, [s.caption for s in plain], seeds)
    else:
        base_trigger, base_plain = base_samples.base_trigger, base_samples.base_plain
    if patch is not None:
        with patch():
            adapted_trigger = generate(pipe, [s.caption for s in trigger], seeds)
            adapted_plain = generate(pipe, [s.caption for s in plain], seeds)
    else:
        adapted_trigger, adapted_plain = base_trigger, base_plain
    samples = Samples(trigger, plain, base_trigger, base_plain, adapted_trigger, adapted_plain)
    return score_samples(samples), samples


def evaluate_adapter(pipe, adapter: str | Path, n: int = 32, seed: int = 0, scale: float = 1.0,
                     base_samples: Samples | None = None) -> tuple[Evaluation, Samples]:
    """`evaluate` with an adapter file as the change."""
    return evaluate(pipe, lambda: adapter_applied(pipe, adapter, scale), n, seed, base_samples)


def score_samples(s: Samples) -> Evaluation:
    bt, bp = read_images(s.base_trigger), read_images(s.base_plain)
    at, ap = read_images(s.adapted_trigger), read_images(s.adapted_plain)
    pixels = float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255.0
                            for a, b in zip(s.adapted_plain, s.base_plain)]))
    return Evaluation(
        n=len(s.trigger),
        concept_with_trigger_before=concept_rate(bt), concept_with_trigger=concept_rate(at),
        concept_without_trigger_before=concept_rate(bp), concept_without_trigger=concept_rate(ap),
        preservation=float(np.mean([_same(a, b) for a, b in zip(ap, bp)])),
        pixel_distance=pixels,
        base_fidelity=fidelity(bp, s.plain),
        adapted_fidelity_trigger=fidelity(at, s.trigger),
    )


def labelled_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], scale: int = 2) -> Image.Image:
    """Rows of images, each with a label above it, upscaled (nearest) so 64 px tiles stay legible."""
    tile = gen.IMAGE_SIZE * scale
    label_h, gap = 14, 4
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (cols * (tile + gap) - gap, len(rows) * (label_h + tile + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = r * (label_h + tile + gap)
        draw.text((2, y + 1), label, fill=(0, 0, 0))
        for c, im in enumerate(images):
            grid.paste(im.resize((tile, tile), Image.NEAREST), (c * (tile + gap), y + label_h))
    return grid


def write_grids(s: Samples, out_dir: str | Path, columns: int = 8) -> list[Path]:
    """before_after_trigger.png and before_after_plain.png: base row over adapted row, same
    prompts and seeds, plus the prompts as a text file beside them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, prompts, before, after in (("trigger", s.trigger, s.base_trigger, s.adapted_trigger),
                                         ("plain", s.plain, s.base_plain, s.adapted_plain)):
        k = min(columns, len(prompts))
        path = out / f"before_after_{name}.png"
        labelled_grid([("before: base model", before[:k]), ("after: base model + adapter", after[:k])]).save(path)
        (out / f"before_after_{name}.txt").write_text(
            "".join(f"{i + 1}. {p.caption}\n" for i, p in enumerate(prompts[:k])), encoding="utf-8")
        paths.append(path)
    return paths


def save_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
