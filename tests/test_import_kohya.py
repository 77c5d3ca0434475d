"""`import-kohya` on setups written the way the sd-scripts and LyCORIS docs write them.

Each produced config is loaded with the trainer's `load_config`; the report must classify every
option it was given.
"""
import shlex
import textwrap
from pathlib import Path

import pytest

from lokr_diffusion.cli import main
from lokr_diffusion.errors import ConfigError
from lokr_diffusion.schema import tomllib
from lokr_diffusion.tools.kohya import import_kohya, parse_kohya_argv
from lokr_diffusion.tools.kohya_write import (DOCS_END, DOCS_START, format_report, format_summary, mapping_markdown,
                                              missing_packages, replace_block, write_import)
from lokr_diffusion.tools.kohya_options import CHANGED, DROPPED, MAPPED, RULES, target_exists
from lokr_diffusion.training.config import load_config

ROOT = Path(__file__).resolve().parent.parent

# A LoKr run on SD 1.5 as the LyCORIS docs' kohya example writes it (sectioned), with a
# dataset_config.toml as sd-scripts' config README writes one.
SD15_LOKR = """
[Basics]
pretrained_model_name_or_path = "models/v1-5-pruned-emaonly.safetensors"
resolution = "512"
seed = 23
max_train_steps = 3000
clip_skip = 2

[Save]
output_dir = "output"
output_name = "mychar_lokr"
save_precision = "fp16"
save_model_as = "safetensors"
save_every_n_steps = 500
save_last_n_steps = 1500
save_state = false

[Network_setup]
network_dim = 100000
network_alpha = 1
network_train_unet_only = false
network_weights = "previous.safetensors"

[LyCORIS]
network_module = "lycoris.kohya"
network_args = ["preset=attn-mlp", "algo=lokr", "factor=8", "full_matrix=True", "use_tucker=False", "dora_wd=True"]

[Optimizer]
train_batch_size = 2
optimizer_type = "AdamW"
unet_lr = 2e-4
text_encoder_lr = 5e-5
optimizer_args = ["weight_decay=0.1", "betas=0.9,0.99"]

[Lr_scheduler]
lr_scheduler = "cosine"
lr_warmup_steps = 0.05

[Further_improvement]
min_snr_gamma = 5
multires_noise_iterations = 6
multires_noise_discount = 0.3
loss_type = "huber"
huber_c = 0.1

[Captions]
color_aug = false
max_token_length = 150
"""

DATASET_CONFIG = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1
flip_aug = true

[[datasets]]
resolution = 512
batch_size = 2
keep_tokens = 2
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64

  [[datasets.subsets]]
  image_dir = 'train/hoge'
  class_tokens = 'hoge girl'
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = 'train/fuga'
  class_tokens = 'fuga boy'
  caption_prefix = 'fuga boy, '
  keep_tokens = 3
  color_aug = true

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'reg/human'
  class_tokens = 'human'
  num_repeats = 1
"""

# An SDXL LoHa run in the flat form `--output_config` writes, with kohya's folder layout.
SDXL_LOHA = """
pretrained_model_name_or_path = "stabilityai/stable-diffusion-xl-base-1.0"
train_data_dir = "train"
reg_data_dir = "reg"
resolution = "1024,1024"
enable_bucket = true
min_bucket_reso = 512
max_bucket_reso = 2048
caption_extension = ".txt"
cache_latents = true
cache_latents_to_disk = true
output_dir = "out"
output_name = "sdxl_loha"
network_module = "lycoris.kohya"
network_dim = 8
network_alpha = 4
network_args = ["algo=loha", "preset=full", "conv_dim=4", "conv_alpha=2", "rank_dropout=0.1", "module_dropout=0.05"]
network_train_unet_only = true
learning_rate = 1e-4
optimizer_type = "Lion"
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 100
max_train_epochs = 10
max_train_steps = 5000
mixed_precision = "bf16"
gradient_checkpointing = true
noise_offset = 0.0357
sample_prompts = "prompts.txt"
sample_every_n_steps = 200
xformers = true
"""

# kohya's Flux.1 LoRA example command line, with LyCORIS LoKr instead of networks.lora_flux.
FLUX_COMMAND = """accelerate launch --mixed_precision bf16 --num_cpu_threads_per_process 1 flux_train_network.py
--pretrained_model_name_or_path flux1-dev.safetensors --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors
--ae ae.safetensors --cache_latents_to_disk --save_model_as safetensors --sdpa --persistent_data_loader_workers
--max_data_loader_n_workers 2 --seed 42 --gradient_checkpointing --mixed_precision bf16 --save_precision bf16
--network_module lycoris.kohya --network_dim 10000 --network_args "algo=lokr" "factor=16" "preset=attn-mlp"
--network_train_unet_only --optimizer_type adamw8bit --learning_rate 1e-4 --cache_text_encoder_outputs
--cache_text_encoder_outputs_to_disk --fp8_base --highvram --max_train_epochs 4 --save_every_n_epochs 1
--train_data_dir train --output_dir out --output_name flux-lokr --timestep_sampling shift
--discrete_flow_shift 3.1582 --model_prediction_type raw --guidance_scale 1.0 --min_snr_gamma 5"""


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _load(result, tmp_path: Path, name: str = "run.toml"):
    """Write the import and load it with the trainer's loader (the optimizer's package may be
    missing on a test machine: load it as AdamW then, as write_import checks it)."""
    out, report = write_import(result, tmp_path / name)
    overrides = ["train.optimizer=adamw"] if missing_packages(result) else []
    return load_config(out, overrides), tomllib.loads(out.read_text()), report


def _statuses(result, option):
    return [line.status for line in result.lines if line.option == option]


def _check_pending(result, doc, option, target, value):
    """A pending target is written when this version has it, else reported with its name."""
    section, _, key = target.partition(".")
    line = next(x for x in result.lines if x.option == option)
    if target_exists(target):
        assert doc[section][key] == value, (option, doc.get(section))
    else:
        assert key not in doc.get(section, {})
        assert target in line.pending and f"`{target}" in line.note and line.status in (DROPPED, CHANGED)


def test_sd15_lokr_with_dataset_config(tmp_path):
    config = _write(tmp_path / "lokr.toml", SD15_LOKR)
    dataset = _write(tmp_path / "dataset_config.toml", DATASET_CONFIG)
    (tmp_path / "previous.safetensors").write_bytes(b"")  # network_weights: the config checks that it exists
    result = import_kohya(config, dataset_config=dataset, script="train_network.py", kohya_dir=tmp_path)
    cfg, doc, report = _load(result, tmp_path)

    assert (result.family, cfg.model.family) == ("sd1", "sd1")
    assert cfg.model.pretrained_model == (tmp_path / "models/v1-5-pruned-emaonly.safetensors").as_posix()
    net = cfg.network
    assert (net.algo, net.preset, net.factor, net.dim, net.alpha, net.full_matrix) == \
        ("lokr", "attn-mlp", 8, 100000, 1.0, True)
    assert net.train_text_encoder and net.train_unet and net.conv_dim is None  # attn-mlp: no convs
    t = cfg.train
    assert (t.max_steps, t.batch_size, t.unet_lr, t.text_encoder_lr, t.weight_decay) == (3000, 2, 2e-4, 5e-5, 0.1)
    assert (t.lr_scheduler, t.lr_warmup_steps, t.min_snr_gamma, t.seed) == ("cosine", 150, 5.0, 23)
    assert t.learning_rate == 2e-6  # kohya's default, written out
    assert (cfg.output.name, cfg.output.save_dtype, cfg.output.save_every_steps, cfg.output.keep_last) == \
        ("mychar_lokr", "fp16", 500, 3)
    assert cfg.output_dir == tmp_path / "output"

    datasets = cfg.data["datasets"]
    assert [Path(d["dir"]).relative_to(tmp_path).as_posix() for d in datasets] == ["train/hoge", "train/fuga",
                                                                                   "reg/human"]
    assert [d["class_token"] for d in datasets] == ["hoge girl", "fuga boy", "human"]
    assert [d.get("repeats", cfg.data.get("repeats")) for d in datasets] == [10, None, 1]
    assert [d.get("keep_tokens") for d in datasets] == [2, 3, 2]  # subset over [[datasets]] over [general]
    assert datasets[2]["is_reg"] is True and datasets[1]["caption_prefix"] == "fuga boy, "
    shared = cfg.data
    assert (shared["resolution"], shared["enable_bucket"], shared["bucket_step"], shared["flip"]) == (512, True, 64, True)
    assert shared["shuffle_caption"] is True and shared["caption_extension"] == ".txt"

    # every option given is in the report, once per place it was given
    given = {k for section in tomllib.loads(SD15_LOKR).values() for k in section}
    reported = {line.option for line in result.lines if not line.origin.startswith(("network_args",
                                                                                   "kohya default",
                                                                                   "dataset_config"))}
    assert given <= reported
    assert all(line.status in (MAPPED, CHANGED, DROPPED) for line in result.lines)
    raw = tomllib.loads(DATASET_CONFIG)
    tables = [raw["general"], *raw["datasets"], *(s for d in raw["datasets"] for s in d["subsets"])]
    from_dataset = [line for line in result.lines if line.origin.startswith("dataset_config.toml")]
    assert sorted(line.option for line in from_dataset) == sorted(k for t in tables for k in t if k != "subsets")
    assert {line.origin for line in result.lines if line.option == "network_args"} == {"lokr.toml [LyCORIS]"}
    assert sorted(line.option for line in result.lines if line.origin.startswith("network_args")) == \
        ["algo", "dora_wd", "factor", "full_matrix", "preset", "use_tucker"]
    assert _statuses(result, "algo") == [MAPPED] and _statuses(result, "factor") == [MAPPED]
    assert _statuses(result, "color_aug") == [DROPPED, DROPPED]
    assert _statuses(result, "max_token_length") == [DROPPED]
    assert _statuses(result, "lr_warmup_steps") == [CHANGED]  # a share of the steps, written as steps
    assert _statuses(result, "save_last_n_steps") == [CHANGED]
    assert _statuses(result, "caption_prefix") == [CHANGED]
    assert set(_statuses(result, "keep_tokens")) == {CHANGED}  # caption_prefix is used: the count differs
    assert result.line("batch_size").status == DROPPED  # train_batch_size wins
    assert result.line("learning_rate", "kohya default").targets == {"train.learning_rate": 2e-6}
    assert "`network_dim`" in report.read_text() and "| `color_aug` |" in report.read_text()

    for option, target, value in [("clip_skip", "train.clip_skip", 2),
                                  ("multires_noise_iterations", "train.multires_noise_iterations", 6),
                                  ("multires_noise_discount", "train.multires_noise_discount", 0.3),
                                  ("loss_type", "train.loss_type", "huber"), ("huber_c", "train.huber_c", 0.1),
                                  ("network_weights", "network.init_from", (tmp_path / "previous.safetensors").as_posix()),
                                  ("dora_wd", "network.weight_decompose", True),
                                  ("use_tucker", "network.use_tucker", False)]:
        _check_pending(result, doc, option, target, value)
    _check_pending(result, doc, "optimizer_args", "train.optimizer_args", {"betas": [0.9, 0.99]})


def test_sdxl_loha_flat_config_with_folders(tmp_path):
    (tmp_path / "prompts.txt").write_text("# samples\na photo of mychar --w 1024 --h 1024 --s 30\n\nmychar, smiling --n blurry\n")
    config = _write(tmp_path / "sdxl_loha.toml", SDXL_LOHA)
    result = import_kohya(config, kohya_dir=tmp_path)
    cfg, doc, _ = _load(result, tmp_path)

    assert result.family == "sdxl" and "model name" in result.family_reason
    assert cfg.model.pretrained_model == "stabilityai/stable-diffusion-xl-base-1.0"  # a hub id stays one
    net = cfg.network
    assert (net.algo, net.preset, net.dim, net.alpha, net.conv_dim, net.conv_alpha) == ("loha", "full", 8, 4.0, 4, 2.0)
    assert (net.rank_dropout, net.module_dropout, net.train_text_encoder) == (0.1, 0.05, False)
    assert cfg.train.epochs == 10 and cfg.train.max_steps is None  # epochs override steps in kohya
    assert _statuses(result, "max_train_steps") == [DROPPED]
    assert cfg.train.optimizer == "adamw" and _statuses(result, "optimizer_type") == [DROPPED]  # Lion
    assert (cfg.train.lr_scheduler, cfg.train.lr_warmup_steps, cfg.train.noise_offset) == \
        ("constant_with_warmup", 100, 0.0357)
    assert cfg.output.save_dtype == "fp32"  # kohya's default: the training dtype
    train, reg = cfg.data["datasets"]
    assert train == {"dir": (tmp_path / "train").as_posix()}
    assert reg == {"dir": (tmp_path / "reg").as_posix(), "is_reg": True}
    assert cfg.data["resolution"] == [1024, 1024] and cfg.data["cache_latents"] == "disk"
    assert (cfg.data["min_bucket_reso"], cfg.data["max_bucket_reso"]) == (512, 2048)
    if target_exists("sample.prompt_file"):
        assert doc["sample"]["prompt_file"] == (tmp_path / "prompts.txt").as_posix()
    else:  # the prompts are copied, their per-prompt options are not
        assert cfg.sample.prompts == ["a photo of mychar", "mychar, smiling"]
        assert _statuses(result, "sample_prompts") == [CHANGED]
    assert cfg.sample.every_steps == 200
    assert [line.status for line in result.lines if line.origin.startswith("network_args")] == [MAPPED] * 6


def test_flux_command_line(tmp_path):
    result = import_kohya(argv=shlex.split(FLUX_COMMAND), kohya_dir=tmp_path)
    cfg, doc, _ = _load(result, tmp_path)

    assert result.family == "flux" and "flux_train_network.py" in result.family_reason
    assert (cfg.network.algo, cfg.network.factor, cfg.network.dim, cfg.network.preset) == ("lokr", 16, 10000, "attn-mlp")
    assert cfg.network.train_text_encoder is False
    t = cfg.train
    assert (t.timestep_sampling, t.logit_mean, t.logit_std, t.shift, t.guidance) == \
        ("logit_normal", 0.0, 1.0, 3.1582, 1.0)
    assert t.min_snr_gamma is None and _statuses(result, "min_snr_gamma") == [DROPPED]  # DDPM only
    assert (t.mixed_precision, t.epochs, t.seed, t.num_workers) == ("bf16", 4, 42, 2)
    assert cfg.model.base_dtype == "fp8" and _statuses(result, "fp8_base") == [CHANGED]
    assert cfg.output.save_every_epochs == 1 and cfg.output.save_dtype == "bf16"
    assert cfg.data["datasets"] == [{"dir": (tmp_path / "train").as_posix()}]
    assert cfg.data["cache_latents"] == "disk"
    assert result.line("(launcher)").status == DROPPED
    for option in ("clip_l", "t5xxl", "ae", "sdpa", "cache_text_encoder_outputs", "highvram"):
        assert _statuses(result, option) == [DROPPED], option
    assert _statuses(result, "model_prediction_type") == [MAPPED]  # raw is what this project does
    assert _statuses(result, "guidance_scale") == [MAPPED]


def test_flux_default_timesteps_and_kohya_lora(tmp_path):
    """Without timestep options a Flux.1 import samples as kohya does by default; kohya's own
    networks.lora_flux is LoRA on attn-mlp."""
    argv = ["flux_train_network.py", "--pretrained_model_name_or_path", "flux1-schnell.safetensors",
            "--network_module", "networks.lora_flux", "--network_dim", "16", "--train_data_dir", "img"]
    result = import_kohya(argv=argv, kohya_dir=tmp_path)
    cfg, _, _ = _load(result, tmp_path)
    assert result.family == "flux-schnell"
    assert (cfg.network.algo, cfg.network.preset, cfg.network.alpha) == ("lora", "attn-mlp", 1.0)
    assert (cfg.train.timestep_sampling, cfg.train.shift) == ("uniform", 3.0)
    assert result.line("timestep_sampling", "kohya default").status == CHANGED


def test_argv_parsing_forms():
    script, options, launcher = parse_kohya_argv(
        ["python", "sdxl_train_network.py", "--resolution=1024,1024", "--network_args", "algo=lokr", "factor=4",
         "--gradient_checkpointing", "--noise_offset", "-0.1", "--text_encoder_lr", "1e-5"])
    assert (script, launcher) == ("sdxl_train_network.py", ["python"])
    assert options == {"resolution": "1024,1024", "network_args": ["algo=lokr", "factor=4"],
                       "gradient_checkpointing": True, "noise_offset": "-0.1", "text_encoder_lr": "1e-5"}
    with pytest.raises(ConfigError, match="not an option's value"):
        parse_kohya_argv(["train_network.py", "stray", "--seed", "1"])


@pytest.mark.parametrize("argv, family", [
    (["train_network.py", "--v2", "--v_parameterization", "--pretrained_model_name_or_path", "m.safetensors"], "sd2"),
    (["--pretrained_model_name_or_path", "sd3.5_medium.safetensors", "--clip_g", "g.safetensors"], "sd35-medium"),
    (["--pretrained_model_name_or_path", "ckpt/sd_xl_base_1.0.safetensors"], "sdxl"),
    (["--pretrained_model_name_or_path", "some/model"], "auto"),
])
def test_family_detection(tmp_path, argv, family):
    result = import_kohya(argv=argv + ["--train_data_dir", "x"], kohya_dir=tmp_path)
    assert result.family == family
    assert result.config["model"].get("family", "auto") == family
    if family == "sd2":
        assert result.config["model"]["prediction_type"] == "v_prediction"


def test_what_cannot_be_imported(tmp_path):
    with pytest.raises(ConfigError, match="algo='dylora' cannot be imported"):
        import_kohya(argv=["--network_module", "lycoris.kohya", "--network_args", "algo=dylora"], kohya_dir=tmp_path)
    with pytest.raises(ConfigError, match="networks.oft"):
        import_kohya(argv=["--network_module", "networks.oft"], kohya_dir=tmp_path)
    with pytest.raises(ConfigError, match="network_dim: expected an integer"):
        import_kohya(argv=["--network_dim", "eight"], kohya_dir=tmp_path)
    # a value this project refuses is taken out and reported with the loader's reason
    result = import_kohya(argv=["--pretrained_model_name_or_path", "m", "--train_data_dir", "img",
                                "--noise_offset", "1.5", "--seed", "7"], kohya_dir=tmp_path)
    cfg, _, report = _load(result, tmp_path, "refused.toml")
    assert cfg.train.noise_offset == 0.0 and cfg.train.seed == 7
    line = result.line("noise_offset")
    assert line.status == DROPPED and "train.noise_offset" in line.note and not line.targets
    assert "refused by this version's config" in report.read_text()
    for path in (tmp_path / "refused.toml", report):
        path.unlink()
    result = import_kohya(argv=["--pretrained_model_name_or_path", "m", "--network_dim", "4"], kohya_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"does not load: .*\[data\]"):  # no images given anywhere
        write_import(result, tmp_path / "x.toml")
    assert not list(tmp_path.glob("*.toml")) and not list(tmp_path.glob(".*"))


def test_cli_writes_config_and_report(tmp_path, capsys):
    out = tmp_path / "run.toml"
    argv = ["import-kohya", "--out", str(out), "--kohya-dir", str(tmp_path), "--",
            "accelerate", "launch", "train_network.py", "--pretrained_model_name_or_path", "model.safetensors",
            "--train_data_dir", "img", "--network_module", "networks.lora", "--network_dim", "32",
            "--network_alpha", "16", "--network_args", "conv_dim=8", "--output_name", "mine", "--bogus_option", "1"]
    assert main(argv) == 0
    cfg = load_config(out)
    assert (cfg.network.algo, cfg.network.preset, cfg.network.conv_dim, cfg.network.conv_alpha) == ("lora", "full", 8, 16.0)
    report = (tmp_path / "run_kohya_report.md").read_text()
    assert "| `bogus_option` |" in report and "not a kohya option this importer knows" in report
    assert "wrote" in capsys.readouterr().out
    assert main(argv) == 2  # exists: refuses without --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_rules_name_real_keys():
    """A typo in the table's targets fails here: every target is a key of the config."""
    special = {"network", "data"}
    for rule in RULES:
        if rule.target and rule.target not in special:
            assert target_exists(rule.target), rule


def test_report_renders_every_line(tmp_path):
    config = _write(tmp_path / "lokr.toml", SD15_LOKR)
    result = import_kohya(config, argv=["--train_data_dir", "img"], kohya_dir=tmp_path)
    report = format_report(result)
    assert report.count("\n| `") == len(result.lines)


def test_docs_mapping_tables_are_current():
    doc = (ROOT / "docs" / "coming-from-kohya.md").read_text()
    assert DOCS_START in doc and DOCS_END in doc
    assert replace_block(doc, mapping_markdown()) == doc, \
        "docs/coming-from-kohya.md is stale: python -m lokr_diffusion.tools.kohya_write --write-docs docs/coming-from-kohya.md"
    assert "docs/coming-from-kohya.md" in (ROOT / "README.md").read_text()


def test_command_line_with_config_file_wins_over_it(tmp_path):
    """`--config_file` and `--dataset_config` inside a command line are read from the folder kohya ran
    in, and the command line's own values win, as in kohya."""
    _write(tmp_path / "lokr.toml", SD15_LOKR)
    _write(tmp_path / "dataset_config.toml", DATASET_CONFIG)
    argv = ["train_network.py", "--config_file", "lokr", "--dataset_config", "dataset_config.toml",
            "--network_dim", "8", "--network_alpha=4"]
    result = import_kohya(argv=argv, kohya_dir=tmp_path)
    cfg, _, _ = _load(result, tmp_path)
    assert (cfg.network.dim, cfg.network.alpha, cfg.network.factor) == (8, 4.0, 8)
    assert result.line("network_dim").origin == "command line"
    assert result.line("factor").origin == "network_args (lokr.toml [LyCORIS])"
    assert len(cfg.data["datasets"]) == 3
    assert str(tmp_path / "dataset_config.toml") in result.sources


def test_summary_lists_what_was_lost(tmp_path):
    result = import_kohya(argv=["--pretrained_model_name_or_path", "m", "--train_data_dir", "img",
                                "--color_aug", "--debug_dataset=false", "--network_dropout", "0"], kohya_dir=tmp_path)
    out, report = write_import(result, tmp_path / "run.toml")
    text = format_summary(result, out, report)
    assert "dropped  color_aug: not implemented" in text
    assert "debug_dataset" not in text and "network_dropout" not in text
    assert "(2 dropped options were false, 0 or empty" in text


@pytest.mark.skipif(__import__("os").name == "nt", reason="a Windows path is a local path there")
def test_windows_paths_are_kept_and_flagged(tmp_path):
    dataset = _write(tmp_path / "ds.toml", """
        [[datasets]]
        resolution = [768, 768]
        batch_size = 2
          [[datasets.subsets]]
          image_dir = 'C:\\piyo'
          num_repeats = 2
        """)
    result = import_kohya(argv=["--pretrained_model_name_or_path", "m"], dataset_config=dataset, kohya_dir=tmp_path)
    cfg, doc, _ = _load(result, tmp_path)
    assert doc["data"]["datasets"][0]["dir"] == "C:\\piyo" and doc["data"]["resolution"] == [768, 768]
    assert "Windows path" in result.line("image_dir").note


@pytest.mark.parametrize("network_args, expected", [
    (["algo=lokr"], ("lokr", "full", 4, 1.0)),  # LyCORIS's default preset trains convs at network_dim
    (["algo=locon", "preset=full-lin", "conv_dim=8"], ("lora", "full", None, None)),  # full-lin: no convs
    (["algo=loha", "preset=attn-only", "conv_dim=8", "conv_alpha=4"], ("loha", "attn-only", 8, 4.0)),
])
def test_lycoris_presets_and_convs(tmp_path, network_args, expected):
    argv = ["train_network.py", "--pretrained_model_name_or_path", "m", "--train_data_dir", "img",
            "--network_module", "lycoris.kohya", "--network_args", *network_args]
    cfg, _, _ = _load(import_kohya(argv=argv, kohya_dir=tmp_path), tmp_path)
    net = cfg.network
    assert (net.algo, net.preset, net.conv_dim, net.conv_alpha) == expected
    assert (net.dim, net.alpha) == (4, 1.0)  # kohya's defaults, written out


def test_sd3_timesteps(tmp_path):
    argv = ["sd3_train_network.py", "--pretrained_model_name_or_path", "sd3.5_large.safetensors",
            "--train_data_dir", "img", "--network_module", "networks.lora_sd3", "--weighting_scheme", "cosmap",
            "--training_shift", "3.0", "--min_timestep", "100"]
    result = import_kohya(argv=argv, kohya_dir=tmp_path)
    cfg, _, _ = _load(result, tmp_path)
    assert (cfg.model.family, cfg.train.timestep_sampling, cfg.train.loss_weighting, cfg.train.shift) == \
        ("sd35-large", "cosmap", "cosmap", 3.0)
    assert _statuses(result, "min_timestep") == [DROPPED]
