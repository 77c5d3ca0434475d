"""A small CLIP BPE tokenizer made locally, for tiny test pipelines and the toy model.

The tests and the offline quickstart cannot download the real CLIP vocabulary, but the code
paths users run (``CLIPTokenizer.from_pretrained``, padding, pooling at the end token) must be
the real ones; so the merges are learned here, deterministically, from a small caption
vocabulary, and written in the files' real layout.
"""
from __future__ import annotations

import functools
import itertools
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

__all__ = ["tokenizer_files", "write_tiny_tokenizer"]


# Small English caption vocabulary the tiny BPE tokenizer learns its merges from, so common
# caption words become one or two tokens (as with the real CLIP vocabulary) and captions
# give short, realistic token sequences.
_WORDS = """
a an the and of in on with at to from by for is are this that it its as or over under near
photo photograph picture image painting drawing illustration portrait render art artwork style
sketch watercolor oil digital anime cartoon realistic detailed high quality best masterpiece
man woman person people girl boy child children baby face hair eyes smile hand hands body
dog dogs cat cats bird birds horse fish animal animals flower flowers tree trees grass forest
house building city street road car cars bike train boat ship water river lake sea ocean beach
mountain mountains sky cloud clouds sun moon star stars night day light dark shadow sunset
red green blue yellow white black orange purple pink brown gray grey gold silver color colors
small large big little tall old young new beautiful pretty cute happy sad standing sitting
walking running looking wearing holding playing background foreground close up view top side
front back left right center two three one many some table chair room window door wall floor
bed book books cup food plate bread fruit apple shirt dress hat glasses jacket shoes
field garden park snow rain winter summer spring autumn fire stone rock sand wood metal glass
toy robot castle bridge tower sign logo text letter word lokr adapter training sample
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (bytes that print map to themselves)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
            + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_merges(words: Sequence[str], max_merges: int = 1000) -> list[tuple[str, str]]:
    """Greedy BPE on a word list: merge the most frequent adjacent pair until words are whole.

    Ties break on the pair itself, so the result (and thus token ids) is deterministic.
    """
    byte_char = _bytes_to_unicode()
    corpus = Counter()
    for w in words:
        chars = [byte_char[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        corpus[tuple(chars)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for symbols, freq in corpus.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new_corpus: Counter = Counter()
        for symbols, freq in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_corpus[tuple(out)] += freq
        corpus = new_corpus
    return merges


@functools.cache
def tokenizer_files(pad_token: str) -> dict[str, str]:
    base = list(_bytes_to_unicode().values())
    merges = _learn_merges(sorted(set(_WORDS)))
    tokens = base + [c + "</w>" for c in base]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": pad_token}
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
              "do_lower_case": True, "errors": "replace", "clean_up_tokenization_spaces": False,
              "add_prefix_space": False}
    return {
        "vocab.json": json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(special, indent=2),
        "tokenizer_config.json": json.dumps(config, indent=2),
    }


def write_tiny_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write a small CLIP BPE tokenizer (vocab.json, merges.txt, configs) into ``folder``.

    Same layout as the real CLIP files (256 byte characters, their ``</w>`` forms, merged
    symbols, then ``<|startoftext|>`` and ``<|endoftext|>`` as the two highest ids), so it
    loads with ``CLIPTokenizer.from_pretrained`` in both old (slow) and new transformers,
    and pooling at the highest id finds ``<|endoftext|>`` as with the real vocabulary.
    SDXL's second tokenizer pads with ``"!"``, hence ``pad_token``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for fname, text in tokenizer_files(pad_token).items():
        (folder / fname).write_text(text, encoding="utf-8")
    return folder
