"""A corpus of bad inputs, made here: each is refused with a message that names the problem,
before anything is written, and leaves the model untouched."""
import json
import struct
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from lokr_diffusion import AdapterConfig, AdapterFileError, create_network, list_adapters, load_adapter
from lokr_diffusion.training.loop import main as train_main

from .test_train import DATASET, write_config

# -- configs and datasets, through the trainer's command line --------------------------------------

CONFIG_CASES = {
    "unknown key": ({"train": {"max_stepz": 3}}, "train.max_stepz: unknown key (did you mean 'max_steps'?)"),
    "unknown section": ({"trian": {"seed": 1}}, "[trian]: unknown section (did you mean [train]?)"),
    "wrong type": ({"train": {"batch_size": "two"}}, "train.batch_size: expected int, got 'two'"),
    "negative steps": ({"train": {"max_steps": -5}}, "train.max_steps: must be at least 1, got -5"),
    "factor 0": ({"network": {"factor": 0}}, "network.factor: expected a non-zero integer"),
    "rank 0": ({"network": {"dim": 0}}, "network.dim: expected a positive integer, got 0"),
    "unknown algo": ({"network": {"algo": "lokk"}}, "network.algo: 'lokk' is not one of"),
    "fp8": ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision: 'fp8' is not one of no, fp16, bf16"),
    "timestep range": ({"train": {"min_timestep": 500, "max_timestep": 100}}, "train.max_timestep: must be in (500, 1000]"),
    "sample size": ({"sample": {"width": 100, "prompts": ["x"]}}, "sample.width: must be a positive multiple of 8"),
    "dataset key": ({"data": {"caption_extention": ".txt"}}, "caption_extention"),
    "dataset type": ({"data": {"repeats": "many"}}, "repeats"),
}

DATASET_CASES = {  # (make the folder, in the error, in the per-file warning)
    "missing folder": (lambda d: d / "nowhere", "nowhere", None),
    "empty folder": (lambda d: (d / "empty").mkdir() or d / "empty", "no usable images", None),
    "zero-byte image only": (lambda d: _only(d, "a.png", b""), "no usable images", "a.png: empty file"),
    "not an image": (lambda d: _only(d, "a.png", b"hello, I am text"), "no usable images", "a.png: not an image"),
    "truncated png only": (lambda d: _only(d, "a.png", (DATASET / "shape_00.png").read_bytes()[:200]),
                           "no usable images", "a.png: "),
}


def _only(root: Path, name: str, data: bytes) -> Path:
    folder = root / "bad"
    folder.mkdir()
    (folder / name).write_bytes(data)
    (folder / (Path(name).stem + ".txt")).write_text("a caption")
    return folder


def _run(tmp_path, capsys, **sections):
    cfg = write_config(tmp_path, tmp_path / "no-such-model", **sections)
    code = train_main(["--config", str(cfg)])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config(case, tmp_path, capsys):
    sections, needle = CONFIG_CASES[case]
    code, err = _run(tmp_path, capsys, **sections)
    assert code == 2 and needle in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_bad_dataset_stops_before_the_model_loads(case, tmp_path, capsys, caplog):
    make, needle, warning = DATASET_CASES[case]
    folder = make(tmp_path)
    code, err = _run(tmp_path, capsys, data={"datasets": [{"dir": str(folder)}]})
    assert code == 2 and needle in err and str(folder) in err, err
    if warning:
        assert warning in caplog.text, caplog.text
    assert "no-such-model" not in err  # the dataset failed first
    assert not (tmp_path / "out" / "t.safetensors").exists()


def test_missing_caption_with_error_policy(tmp_path, capsys):
    folder = tmp_path / "nocap"
    folder.mkdir()
    (folder / "a.png").write_bytes((DATASET / "shape_00.png").read_bytes())
    code, err = _run(tmp_path, capsys, data={"datasets": [{"dir": str(folder), "missing_caption": "error"}]})
    assert code == 2 and "a.png" in err and "caption" in err, err


def test_random_crop_with_cached_latents(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, data={"random_crop": True, "cache_latents": "disk"})
    assert code == 2 and "random_crop" in err, err


# -- adapter files, through load_adapter on a pipeline ------------------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_sd15_path):
    p = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    return p


@pytest.fixture(scope="module")
def good_file(pipe, tmp_path_factory):
    net = create_network(AdapterConfig(preset="attn-mlp", factor=4, dim=4), unet=pipe.unet, text_encoders=[pipe.text_encoder])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    path = net.save(tmp_path_factory.mktemp("good") / "good.safetensors", dtype=torch.float32)
    net.remove()
    return path


KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _raw(path: Path, header: dict, payload: bytes = b"", extra_header: bytes | None = None) -> Path:
    raw = extra_header if extra_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return path


def _edited(good: Path, out: Path, edit) -> Path:
    sd = {k: v.clone() for k, v in load_file(good).items()}
    edit(sd)
    save_file(sd, out)
    return out


ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
ADAPTER_CASES = {
    "random bytes": (lambda g, t: _write(t / "r.safetensors", bytes(range(256)) * 9), "not a safetensors file"),
    "empty file": (lambda g, t: _write(t / "e.safetensors", b""), "not a safetensors file"),
    "truncated": (lambda g, t: _write(t / "tr.safetensors", g.read_bytes()[:-1000]), "tr.safetensors"),
    "header longer than file": (lambda g, t: _write(t / "h.safetensors", struct.pack("<Q", 10**9) + b"{}"), "header length"),
    "header not json": (lambda g, t: _raw(t / "j.safetensors", {}, extra_header=b"{nope"), "header is not JSON"),
    "duplicate keys": (lambda g, t: _raw(t / "d.safetensors", {}, b"\0" * 16,
                                         extra_header=b'{"a.lokr_w1": ' + json.dumps(ENTRY).encode() + b', "a.lokr_w1": '
                                         + json.dumps(ENTRY).encode() + b"}"), "more than once"),
    "offsets outside": (lambda g, t: _raw(t / "o.safetensors", {"a.lokr_w1": ENTRY}, b"\0" * 8), "points outside the file"),
    "size mismatch": (lambda g, t: _raw(t / "s.safetensors", {"a.lokr_w1": dict(ENTRY, shape=[3, 3])}, b"\0" * 16), "needs 36 bytes"),
    "unknown dtype": (lambda g, t: _raw(t / "u.safetensors", {"a.lokr_w1": dict(ENTRY, dtype="F17")}, b"\0" * 16), "unknown dtype"),
    "pickle": (lambda g, t: _write(t / "p.ckpt", b"\x80\x04K\x01."), "pickle"),
    "wrong shape": (lambda g, t: _edited(g, t / "ws.safetensors", lambda sd: sd.__setitem__(f"{KEY}.lokr_w1", torch.ones(3, 3))), "do not fit"),
    "missing tensor": (lambda g, t: _edited(g, t / "mt.safetensors", lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(f"{KEY}.lokr_w2")]), "missing tensor"),
    "nan values": (lambda g, t: _edited(g, t / "nan.safetensors", lambda sd: sd[f"{KEY}.lokr_w1"].fill_(float("nan"))), "non-finite"),
    "integer dtype": (lambda g, t: _edited(g, t / "int.safetensors", lambda sd: sd.__setitem__(f"{KEY}.lokr_w1", sd[f"{KEY}.lokr_w1"].int())), "expected a float type"),
    "sdxl file": (lambda g, t: _edited(g, t / "xl.safetensors", lambda sd: sd.__setitem__("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha", torch.tensor(1.0))), "for SDXL, but the model is SD 1.x"),
    "dora": (lambda g, t: _edited(g, t / "dora.safetensors", lambda sd: sd.__setitem__(f"{KEY}.dora_scale", torch.ones(1))), "DoRA"),
    "unknown tensor": (lambda g, t: _edited(g, t / "unk.safetensors", lambda sd: sd.__setitem__(f"{KEY}.lokr_w9", torch.ones(1))), "unknown tensors ['lokr_w9']"),
    "key for no module": (lambda g, t: _edited(g, t / "nomod.safetensors", lambda sd: sd.__setitem__("lora_unet_up_blocks_9_attn.lokr_w1", torch.ones(1))), "match no module"),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_bad_adapter_file(case, pipe, good_file, tmp_path):
    make, needle = ADAPTER_CASES[case]
    path = make(good_file, tmp_path)
    before = {k: v.clone() for m in (pipe.unet, pipe.text_encoder) for k, v in m.state_dict().items()}
    with pytest.raises(AdapterFileError) as info:
        load_adapter(pipe, path, strict=True)
    assert needle in str(info.value) and path.name in str(info.value), str(info.value)
    assert list_adapters(pipe) == {}
    after = {k: v for m in (pipe.unet, pipe.text_encoder) for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():  # and no hook stayed behind
        ids = torch.zeros(1, 5, dtype=torch.long)
        assert torch.equal(pipe.text_encoder(ids)[0], pipe.text_encoder(ids)[0])
