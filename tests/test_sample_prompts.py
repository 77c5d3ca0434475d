"""Per-prompt sample settings (kohya's `--n --w --h --s --l --d`), prompt files, and sampling
that honours them on a tiny pipeline."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from lokr_diffusion.errors import ConfigError
from lokr_diffusion.families import get_family
from lokr_diffusion.training.config import config_from_dict
from lokr_diffusion.training.prompts import SamplePrompt, check_sizes, parse_prompt_line, read_prompt_file
from lokr_diffusion.training.sampling import sample_grids, size_multiple


def test_a_full_line_sets_every_option():
    p = parse_prompt_line("a cat, on a sofa --n blurry, low quality --w 512 --h 768 --s 20 --l 7.5 --d 42", "x:1")
    assert p == SamplePrompt("a cat, on a sofa", negative_prompt="blurry, low quality", width=512, height=768,
                             steps=20, guidance_scale=7.5, seed=42, where="x:1")


def test_options_are_optional_in_any_order_and_any_case():
    assert parse_prompt_line("  a dog  ", "w") == SamplePrompt("a dog", where="w")
    p = parse_prompt_line("a dog --D 7 --W 64", "w")
    assert (p.prompt, p.seed, p.width, p.height, p.negative_prompt) == ("a dog", 7, 64, None, None)
    assert parse_prompt_line("a--b c --n", "w").negative_prompt == ""  # "--" inside a word is text
    assert parse_prompt_line("a--b c --n", "w").prompt == "a--b c"


@pytest.mark.parametrize("line, needle", [
    ("a cat --x 3", r"p\.txt:4: unknown option --x in 'a cat --x 3' \(known: --n negative prompt, --w width"),
    ("a cat --ss euler", "unknown option --ss"),
    ("a cat --w 500", r"--w '500' \(width\) must be a multiple of 8 in \[8, 8192\]"),
    ("a cat --h 0", r"--h '0' \(height\) must be a multiple of 8"),
    ("a cat --s two", r"--s 'two' \(steps\) is not a whole number, in 'a cat --s two'"),
    ("a cat --l nan", r"--l 'nan' \(guidance scale\) must be in \[0, 100\]"),
    ("a cat --l x", r"--l 'x' \(guidance scale\) is not a number"),
    ("a cat --d -1", r"--d '-1' \(seed\) must be in"),
    ("a cat --w", r"--w needs a value \(width\)"),
    ("a cat --w 64 --w 128", "--w is given twice"),
    ("--w 64", "no prompt before the options"),
])
def test_bad_lines_name_the_line(line, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_prompt_line(line, "p.txt:4")


def test_prompt_file_skips_comments_and_names_lines(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\n\na red circle --w 64 --h 32\n  # indented comment\na blue square --d 3\n")
    prompts = read_prompt_file(f)
    assert [(p.prompt, p.width, p.seed, p.where) for p in prompts] == [
        ("a red circle", 64, None, f"{f}:3"), ("a blue square", None, 3, f"{f}:5")]
    f.write_text("ok\nbad --q 1\n")
    with pytest.raises(ConfigError, match=rf"{f}:2: unknown option --q"):
        read_prompt_file(f)
    f.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="holds no prompt"):
        read_prompt_file(f)
    with pytest.raises(ConfigError, match="is not a file"):
        read_prompt_file(tmp_path / "missing.txt")


def test_config_reads_the_prompt_file_relative_to_the_config(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "prompts.txt").write_text("from the file --s 3\n")
    raw = {"model": {"pretrained_model": "x"}, "train": {"max_steps": 1}, "data": {"dir": "data"},
           "sample": {"prompts": ["inline --l 2.5"], "prompt_file": "prompts.txt", "every_steps": 1}}
    cfg = config_from_dict(raw, base_dir=tmp_path)
    assert [(p.prompt, p.guidance_scale, p.steps) for p in cfg.sample_prompts] == [
        ("inline", 2.5, None), ("from the file", None, 3)]
    assert cfg.sample.prompt_file == str(tmp_path / "prompts.txt")
    raw["sample"] = {"prompts": ["a --z 1"]}
    with pytest.raises(ConfigError, match=r"sample.prompts\[0\]: unknown option --z"):
        config_from_dict(raw, base_dir=tmp_path)
    raw["sample"] = {"prompt_file": "nope.txt"}
    with pytest.raises(ConfigError, match="sample.prompt_file: .*nope.txt is not a file"):
        config_from_dict(raw, base_dir=tmp_path)


def test_sizes_must_suit_the_model():
    prompts = [SamplePrompt("a", width=64, height=40, where="p.txt:1"), SamplePrompt("b", where="p.txt:2")]
    check_sizes(prompts, None, None, 8, "SD 1.x")
    with pytest.raises(ConfigError, match=r"--h in p.txt:1: height 40 is not a multiple of 16, which Flux.1 needs"):
        check_sizes(prompts, None, None, 16, "Flux.1")
    with pytest.raises(ConfigError, match=r"sample.width \(used by p.txt:2\): width 72 is not a multiple of 16"):
        check_sizes(prompts[1:], 72, None, 16, "Flux.1")


def test_sampling_honours_size_steps_and_seed(tiny_sd15_path, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert size_multiple(pipe, get_family("sd15")) == pipe.vae_scale_factor
    prompts = [SamplePrompt("a red circle", width=32, height=16, seed=3, steps=2),
               SamplePrompt("a red circle", width=32, height=16, seed=3, steps=2),
               SamplePrompt("a red circle", width=32, height=16, seed=4, steps=2),
               "a red circle"]  # plain strings take the keyword arguments
    torch.manual_seed(123)
    before = torch.get_rng_state()
    out = sample_grids(pipe, prompts, tmp_path, 7, steps=1, width=16, height=24, seed=3, num_images=1)
    assert torch.equal(before, torch.get_rng_state())  # the training RNG is untouched
    shapes = [grid.shape for _, _, grid in out]
    assert shapes == [(16, 32, 3), (16, 32, 3), (16, 32, 3), (24, 16, 3)]
    assert np.array_equal(out[0][2], out[1][2])  # same seed, same image
    assert not np.array_equal(out[0][2], out[2][2])  # another seed
    assert Image.open(out[0][1]).size == (32, 16)
    assert out[0][1].name == "step000007-00-a-red-circle.png"


def test_flux_needs_multiples_of_16(tiny_flux_path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(tiny_flux_path))
    family = get_family("flux")
    assert size_multiple(pipe, family) == 16  # the VAE's 8, times Flux's 2x2 latent patches
    check_sizes([SamplePrompt("a", width=64, height=32, where="p.txt:1")], None, None, 16, family.title)
    with pytest.raises(ConfigError, match=r"--w in p.txt:1: width 72 is not a multiple of 16, which Flux.1"):
        check_sizes([SamplePrompt("a", width=72, where="p.txt:1")], None, None, size_multiple(pipe, family),
                    family.title)
