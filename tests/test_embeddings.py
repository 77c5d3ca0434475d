"""Trigger-word embeddings: start exactly at the word, touch nothing else, and round-trip through
the textual-inversion file into a Diffusers pipeline."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from lokr_diffusion.embeddings import (TriggerEmbedding, embedding_path, expand_trigger, load_embedding,
                                       unload_embedding)
from lokr_diffusion.errors import AdapterFileError, ConfigError
from lokr_diffusion.models import load_pipeline


def _encode(pipe, prompt: str) -> list[torch.Tensor]:
    """Last hidden state of every text encoder, the way the pipelines tokenise (trigger expanded)."""
    out = []
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    for tok, te in pairs:
        text = pipe.maybe_convert_prompt(prompt, tok)
        ids = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out.append(te(ids)[0])
    return out


def _encoders(pipe):
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    text_encoders = [t for t in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if t is not None]
    return tokenizers, text_encoders


def test_expand_trigger_only_replaces_the_whole_word():
    assert expand_trigger("a sks, and sks.", "sks", 3) == "a sks sks_1 sks_2, and sks sks_1 sks_2."
    assert expand_trigger("she asks sksx", "sks", 2) == "she asks sksx"
    assert expand_trigger("a sks", "sks", 1) == "a sks"
    assert embedding_path("out/run.safetensors").name == "run_emb.safetensors"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@torch.no_grad()
def test_embedding_starts_at_the_word_trains_alone_and_loads_into_a_pipeline(family, tiny_pipeline_paths, tmp_path):
    pipe = load_pipeline(str(tiny_pipeline_paths[family]))
    trigger, plain = "a photo of zqv dog", "a photo of a red dog"
    base_trigger, base_plain = _encode(pipe, trigger), _encode(pipe, plain)
    tokenizers, text_encoders = _encoders(pipe)
    pieces = len(tokenizers[0]("zqv", add_special_tokens=False).input_ids)

    emb = TriggerEmbedding("zqv", tokenizers, text_encoders)
    assert emb.num_vectors == pieces > 1 and len(emb.vectors) == len(text_encoders)
    for a, b in zip(_encode(pipe, trigger), base_trigger):  # the new tokens start as the word's pieces
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    with torch.enable_grad():  # a loss on the trigger prompt reaches the vectors, not the frozen matrices
        sum(h.square().sum() for h in _encode(pipe, trigger)).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in emb.vectors)
    assert all(te.get_input_embeddings().weight.grad is None for te in text_encoders)

    for v in emb.vectors:
        v.add_(torch.randn_like(v))
    trained = _encode(pipe, trigger)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(trained, base_trigger))
    for a, b in zip(_encode(pipe, plain), base_plain):  # prompts without the word: bit for bit the same
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    path = emb.save(tmp_path / "run_emb.safetensors")
    keys = {"sd15": ["emb_params"], "sdxl": ["clip_g", "clip_l"]}[family]
    assert sorted(load_file(path)) == keys

    fresh = load_pipeline(str(tiny_pipeline_paths[family]))
    sizes = [len(t) for t in _encoders(fresh)[0]]
    assert load_embedding(fresh, path) == "zqv"  # the word comes from the file's metadata
    for a, b in zip(_encode(fresh, trigger), trained):
        torch.testing.assert_close(a, b)
    unload_embedding(fresh, "zqv")
    assert [len(t) for t in _encoders(fresh)[0]] == sizes
    for a, b in zip(_encode(fresh, trigger), base_trigger):
        torch.testing.assert_close(a, b)


def test_embedding_errors_name_the_problem(tiny_sd15_path, tmp_path):
    pipe = load_pipeline(str(tiny_sd15_path))
    tokenizers, text_encoders = _encoders(pipe)
    word = next(t for t in tokenizers[0].get_vocab() if t.isalpha() and len(t) > 2)  # an existing token
    with pytest.raises(ConfigError, match=f"'{word}' is already a token"):
        TriggerEmbedding(word, tokenizers, text_encoders)

    wrong = tmp_path / "wrong.safetensors"
    save_file({"clip_l": torch.zeros(2, 7)}, str(wrong), {"trigger": "zqv"})
    with pytest.raises(AdapterFileError, match=r"wrong.safetensors: expected tensor\(s\) \['emb_params'\]"):
        load_embedding(pipe, wrong)
    save_file({"emb_params": torch.zeros(2, 7)}, str(wrong), {"trigger": "zqv"})
    width = text_encoders[0].get_input_embeddings().weight.shape[1]
    with pytest.raises(AdapterFileError, match=rf"'emb_params' has shape \(2, 7\), expected \(n, {width}\)"):
        load_embedding(pipe, wrong)
    save_file({"emb_params": torch.zeros(2, width)}, str(wrong))
    with pytest.raises(AdapterFileError, match="no 'trigger' in the metadata"):
        load_embedding(pipe, wrong)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(AdapterFileError, match="junk.safetensors: not a safetensors file"):
        load_embedding(pipe, tmp_path / "junk.safetensors")
