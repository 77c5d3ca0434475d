"""Malformed adapter files through `inspect`, `convert` and `merge`: one clear error, never a traceback.

Each case is a file (or folder, or named pipe) that `load_adapter` refuses; the toolbox must
refuse it too, with a non-zero exit, a message naming the file and the problem, no traceback
and nothing left behind. Every test runs under an alarm, so a reader that blocks (a FIFO
opened for reading) fails instead of hanging the suite.
"""
import json
import math
import os
import signal
import struct
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from lokr_diffusion import ConfigError, list_adapters, load_adapter, set_adapter_scale
from lokr_diffusion.errors import AdapterFileError
from lokr_diffusion.tools import peft
from lokr_diffusion.tools.convert import convert_adapter

from .helpers import load_components
from .test_tools_helpers import make_adapter, rewrite, run_cli

SD_KW = {"safety_checker": None, "requires_safety_checker": False}
TIMEOUT_S = 60


@pytest.fixture(autouse=True)
def _alarm():
    """A test that blocks (e.g. on a FIFO) fails after TIMEOUT_S instead of hanging."""
    def fail(signum, frame):
        raise TimeoutError(f"test blocked for {TIMEOUT_S} s (a reader waited on a special file?)")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def good(tiny_sd15_path, tmp_path_factory):
    """name -> a usable adapter on the tiny SD1.5 model: lokr (low-rank w2), loha, lora, and a PEFT folder."""
    folder = tmp_path_factory.mktemp("good")
    unet, tes = load_components(tiny_sd15_path)
    files = {}
    for algo in ("lokr", "loha", "lora"):
        files[algo] = folder / f"{algo}.safetensors"
        make_adapter(unet, tes, files[algo], seed=1, algo=algo, preset="attn-only", factor=4, dim=2)
    files["peft"] = folder / "peft"
    convert_adapter(files["lokr"], files["peft"], to="peft", component="unet")
    return files


def _key(path: Path, tensor: str) -> str:
    """The first module of the file that has `tensor`."""
    return next(k for k in sorted(load_file(path)) if k.endswith("." + tensor)).rpartition("." + tensor)[0]


def _edit(src: Path, dst: Path, tensor: str, change) -> Path:
    """Copy `src` with one module's tensors passed through `change(module tensors dict)`."""
    key = _key(src, tensor)

    def edit(sd):
        group = {k.partition(".")[2]: v for k, v in sd.items() if k.partition(".")[0] == key}
        for name in group:
            del sd[f"{key}.{name}"]
        change(group)
        sd.update({f"{key}.{n}": v for n, v in group.items()})
        return sd

    return rewrite(src, dst, edit)


def _set(name, make):
    return lambda g: g.__setitem__(name, make(g.get(name)))


def _pop(name):
    return lambda g: g.pop(name)


def _raw(path: Path, header: dict, payload: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return path


def _peft_copy(src: Path, dst: Path, config=None, edit=None) -> Path:
    """A copy of the PEFT folder `src`, its config text replaced and/or its tensors edited."""
    dst.mkdir()
    tensors = load_file(src / peft.WEIGHTS_NAME)
    if edit is not None:
        key = sorted(k for k in tensors if k.endswith(".lokr_w1"))[0]
        edit(tensors, key.rpartition(".")[0])
    save_file(tensors, str(dst / peft.WEIGHTS_NAME))
    text = (src / peft.CONFIG_NAME).read_text() if config is None else config
    if isinstance(text, bytes):
        (dst / peft.CONFIG_NAME).write_bytes(text)
    else:
        (dst / peft.CONFIG_NAME).write_text(text)
    return dst


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("not an adapter")
    return path


def _peft_no_weights(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / peft.CONFIG_NAME).write_text((src / peft.CONFIG_NAME).read_text())
    return dst


def _peft_config_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    save_file(load_file(src / peft.WEIGHTS_NAME), str(dst / peft.WEIGHTS_NAME))
    (dst / peft.CONFIG_NAME).mkdir()
    return dst


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[:-4])
    return dst


NAN, INF = float("nan"), float("inf")
W = "lokr_w2_a"  # a module with a low-rank w2 in the good LoKr file

# case -> (make(good files, tmp folder) -> bad path, text the message must contain)
CASES = {
    "0-dim lokr_w1": (lambda g, t: _edit(g["lokr"], t / "zd1.safetensors", W, _set("lokr_w1", lambda v: torch.tensor(1.0))), "0-D"),
    "0-dim lokr_w2_b": (lambda g, t: _edit(g["lokr"], t / "zd2.safetensors", W, _set("lokr_w2_b", lambda v: torch.tensor(1.0))), "0-D"),
    "1-D lokr_w1": (lambda g, t: _edit(g["lokr"], t / "od.safetensors", W, _set("lokr_w1", lambda v: v.flatten())), "1-D"),
    "empty dimension": (lambda g, t: _edit(g["lokr"], t / "ed.safetensors", W, _set("lokr_w1", lambda v: torch.ones(0, 4))), "empty dimension"),
    "w2_a without w2_b": (lambda g, t: _edit(g["lokr"], t / "now2b.safetensors", W, _pop("lokr_w2_b")), "missing lokr_w2_b"),
    "w1_a without w1_b": (lambda g, t: _edit(g["lokr"], t / "now1b.safetensors", W,
                                             lambda m: m.__setitem__("lokr_w1_a", m.pop("lokr_w1"))), "missing lokr_w1_b"),
    "lora up without down": (lambda g, t: _edit(g["lora"], t / "nodown.safetensors", "lora_up.weight", _pop("lora_down.weight")), "missing lora_down.weight"),
    "loha without hada_w2_b": (lambda g, t: _edit(g["loha"], t / "nohw2b.safetensors", "hada_w1_a", _pop("hada_w2_b")), "missing hada_w2_b"),
    "loha t1 without t2": (lambda g, t: _edit(g["loha"], t / "t1.safetensors", "hada_w1_a", _set("hada_t1", lambda v: torch.ones(2, 2, 1, 1))), "missing hada_t2"),
    "lora rank mismatch": (lambda g, t: _edit(g["lora"], t / "lrm.safetensors", "lora_up.weight", _set("lora_down.weight", lambda v: v[:1])), "rank mismatch"),
    "lokr w2 rank mismatch": (lambda g, t: _edit(g["lokr"], t / "krm.safetensors", W, _set("lokr_w2_b", lambda v: v[:1])), "rank mismatch"),
    "loha rank mismatch": (lambda g, t: _edit(g["loha"], t / "hrm.safetensors", "hada_w1_a", _set("hada_w1_b", lambda v: v[:1])), "rank mismatch"),
    "loha halves differ": (lambda g, t: _edit(g["loha"], t / "halves.safetensors", "hada_w1_a", _set("hada_w2_a", lambda v: torch.ones(v.shape[0] + 1, v.shape[1]))), "do not fit"),
    "float8 factor": (lambda g, t: _edit(g["lokr"], t / "f8.safetensors", W, _set("lokr_w1", lambda v: v.to(torch.float8_e4m3fn))), "float8_e4m3fn"),
    "bool factor": (lambda g, t: _edit(g["lokr"], t / "bool.safetensors", W, _set("lokr_w2_a", lambda v: v > 0)), "dtype bool"),
    "int factor": (lambda g, t: _edit(g["lora"], t / "int.safetensors", "lora_up.weight", _set("lora_up.weight", lambda v: v.int())), "dtype int32"),
    "nan factor": (lambda g, t: _edit(g["lokr"], t / "nan.safetensors", W, _set("lokr_w1", lambda v: v.fill_(NAN))), "non-finite"),
    "inf factor": (lambda g, t: _edit(g["loha"], t / "inf.safetensors", "hada_w1_a", _set("hada_w2_b", lambda v: v.fill_(INF))), "non-finite"),
    "nan alpha": (lambda g, t: _edit(g["lora"], t / "nana.safetensors", "lora_up.weight", _set("alpha", lambda v: torch.tensor(NAN))), "non-finite"),
    "-inf alpha": (lambda g, t: _edit(g["lokr"], t / "infa.safetensors", W, _set("alpha", lambda v: torch.tensor(-INF))), "non-finite"),
    "alpha not scalar": (lambda g, t: _edit(g["lokr"], t / "a2.safetensors", W, _set("alpha", lambda v: torch.ones(2))), "expected a scalar"),
    "bool alpha": (lambda g, t: _edit(g["lokr"], t / "ab.safetensors", W, _set("alpha", lambda v: torch.tensor(True))), "alpha has dtype bool"),
    "not an adapter": (lambda g, t: rewrite(g["lokr"], t / "model.safetensors", lambda sd: {"model.diffusion_model.out.2.weight": torch.ones(2, 2)}), "not an adapter file"),
    "no tensors": (lambda g, t: _raw(t / "empty.safetensors", {"__metadata__": {"ss_network_dim": "4"}}), "not an adapter file"),
    "random bytes": (lambda g, t: (t / "noise.safetensors").write_bytes(bytes(range(256)) * 3) and t / "noise.safetensors", "not a safetensors file"),
    "truncated": (lambda g, t: _truncated(g["lokr"], t / "cut.safetensors"), "points outside the file"),
    "pickle": (lambda g, t: (t / "p.ckpt").write_bytes(b"\x80\x04K\x01.") and t / "p.ckpt", "pickle"),
    "folder": (lambda g, t: _folder(t / "some_folder"), "folder"),
    "named pipe": (lambda g, t: _fifo(t / "pipe.safetensors"), "named pipe"),
    "peft config not json": (lambda g, t: _peft_copy(g["peft"], t / "pc1", "{r: 4,"), "not valid JSON"),
    "peft config not utf-8": (lambda g, t: _peft_copy(g["peft"], t / "pc2", b"\xff\xfe{}"), "not valid JSON"),
    "peft config a list": (lambda g, t: _peft_copy(g["peft"], t / "pc3", "[1, 2]"), "expected a JSON object"),
    "peft config r a string": (lambda g, t: _peft_copy(g["peft"], t / "pc4", '{"peft_type": "LOKR", "r": "four"}'), "r is 'four'"),
    "peft config alpha NaN": (lambda g, t: _peft_copy(g["peft"], t / "pc5", '{"peft_type": "LOKR", "r": 4, "alpha": NaN}'), "alpha is nan"),
    "peft type LORA": (lambda g, t: _peft_copy(g["peft"], t / "pc6", '{"peft_type": "LORA", "r": 4}'), "peft_type"),
    "peft config a folder": (lambda g, t: _peft_config_folder(g["peft"], t / "pc7"), "is a folder"),
    "peft without weights": (lambda g, t: _peft_no_weights(g["peft"], t / "pc8"), "without adapter_model.safetensors"),
    "peft 0-dim factor": (lambda g, t: _peft_copy(g["peft"], t / "pc9", edit=lambda sd, k: sd.__setitem__(f"{k}.lokr_w1", torch.tensor(2.0))), "0-D"),
    "peft nan factor": (lambda g, t: _peft_copy(g["peft"], t / "pc10", edit=lambda sd, k: sd[f"{k}.lokr_w1"].fill_(NAN)), "non-finite"),
    "peft bool factor": (lambda g, t: _peft_copy(g["peft"], t / "pc11", edit=lambda sd, k: sd.__setitem__(f"{k}.lokr_w1", sd[f"{k}.lokr_w1"] > 0)), "dtype bool"),
}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _argv(command: str, bad: Path, tmp_path: Path, base: Path) -> list:
    if command == "inspect":
        return ["inspect", bad]
    if command == "convert":
        return ["convert", bad, tmp_path / "converted.safetensors", "--family", "sd15"]
    return ["merge", "--base", base, "--adapter", bad, "--out", tmp_path / "merged"]


@pytest.mark.parametrize("command", ["inspect", "convert", "merge"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_gives_one_clear_error(case, command, good, tiny_sd15_path, tmp_path, capsys):
    make, needle = CASES[case]
    bad = make(good, tmp_path)
    before = _listing(tmp_path)
    code, out, err = run_cli(capsys, *_argv(command, bad, tmp_path, tiny_sd15_path))
    text = out + err
    assert code != 0, text
    assert "Traceback" not in text
    assert needle in text, text
    assert bad.name in text, text
    assert "within the safe profile" not in text
    assert _listing(tmp_path) == before  # no output, no temporary file


def test_good_files_pass(good, tmp_path, capsys):
    """The cases above are edits of these files; they themselves are fine everywhere."""
    for name in ("lokr", "loha", "lora", "peft"):
        code, out, err = run_cli(capsys, "inspect", good[name])
        assert code == 0 and not err, err
    code, _, err = run_cli(capsys, "convert", good["peft"], tmp_path / "back.safetensors", "--family", "sd15")
    assert code == 0, err


# -- values: NaN, inf and scales --------------------------------------------------------------

def test_inspect_reports_nan_modules_and_exits_1(good, tmp_path, capsys):
    bad = _edit(good["lokr"], tmp_path / "nan.safetensors", W, _set("lokr_w1", lambda v: v.fill_(NAN)))
    code, out, err = run_cli(capsys, "inspect", bad)
    assert code == 1
    assert "ERRORS (1)" in out and "non_finite" in out and "within the safe profile" not in out
    assert len(err.strip().splitlines()) == 1 and "nan.safetensors" in err and "non-finite" in err
    code, out, _ = run_cli(capsys, "inspect", bad, "--json")
    report = json.loads(out)
    assert code == 1 and report["errors"][0]["code"] == "non_finite" and report["errors"][0]["count"] == 1


def test_inspect_file_without_adapter_keys(good, tmp_path, capsys):
    bad = rewrite(good["lokr"], tmp_path / "vae.safetensors", lambda sd: {"decoder.conv_in.weight": torch.ones(2, 2)})
    code, out, err = run_cli(capsys, "inspect", bad)
    assert code == 2 and out == "" and "not an adapter file" in err and "decoder.conv_in.weight" in err


def test_load_adapter_refuses_nonfinite_scales(good, tiny_sd15_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, **SD_KW)
    for kw in ({"scale": NAN}, {"scale": INF}, {"unet_scale": -INF}, {"text_encoder_scale": NAN}):
        with pytest.raises(ConfigError) as info:
            load_adapter(pipe, good["lokr"], **kw)
        assert ("nan" in str(info.value) or "inf" in str(info.value)) and next(iter(kw)) in str(info.value)
        assert isinstance(info.value, ValueError)
    assert list_adapters(pipe) == {}
    load_adapter(pipe, good["lokr"], scale=0.5, adapter_name="a")
    with pytest.raises(ConfigError, match="nan"):
        set_adapter_scale(pipe, "a", NAN)
    assert list_adapters(pipe)["a"]["scale"] == 0.5


def test_load_adapter_refuses_fifo_and_bad_peft_config(good, tiny_sd15_path, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, **SD_KW)
    fifo = _fifo(tmp_path / "pipe.safetensors")
    with pytest.raises(AdapterFileError, match="named pipe"):
        load_adapter(pipe, fifo)
    for case in ("peft config a list", "peft config not json", "peft 0-dim factor"):
        make, needle = CASES[case]
        with pytest.raises(AdapterFileError) as info:
            load_adapter(pipe, make(good, tmp_path))
        assert needle in str(info.value)
    assert list_adapters(pipe) == {}


def test_peft_folder_loads_as_it_converts(good, tiny_sd15_path, tmp_path):
    """load_adapter reads PEFT folders with the same reader as convert: same effective weights."""
    from .test_tools_helpers import deltas

    unet, tes = load_components(tiny_sd15_path)
    back = tmp_path / "back.safetensors"
    convert_adapter(good["peft"], back, family="sd15")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, **SD_KW)
    load_adapter(pipe, good["peft"], adapter_name="p")
    loaded = {a.key: a.delta_weight().detach() for a in pipe._lokr_diffusion_adapters.adapters["p"].network.adapters()}
    want = deltas(back, unet, tes)
    assert set(loaded) == set(want) and all(torch.allclose(loaded[k], want[k], atol=1e-6) for k in want)


def test_convert_refuses_nan_and_writes_nothing(good, tmp_path):
    bad = _edit(good["lora"], tmp_path / "nan.safetensors", "lora_up.weight", _set("lora_up.weight", lambda v: v.fill_(NAN)))
    with pytest.raises(AdapterFileError, match="non-finite"):
        convert_adapter(bad, tmp_path / "out.safetensors", family="sd15")
    with pytest.raises(AdapterFileError, match="non-finite"):
        convert_adapter(bad, tmp_path / "out_peft", to="peft", family="sd15")
    assert _listing(tmp_path) == ["nan.safetensors"]


def test_convert_refuses_fp16_overflow(good, tmp_path, capsys):
    big = _edit(good["lokr"], tmp_path / "big.safetensors", W, _set("lokr_w1", lambda v: v * 1e6))
    code, out, err = run_cli(capsys, "convert", big, tmp_path / "half.safetensors", "--dtype", "fp16", "--family", "sd15")
    assert code == 2 and "non-finite" in err and "big.safetensors" in err and "Traceback" not in out + err
    assert _listing(tmp_path) == ["big.safetensors"]


@pytest.mark.parametrize("scale", ["inf", "nan", "-inf"])
def test_merge_refuses_nonfinite_scale(scale, good, tiny_sd15_path, tmp_path, capsys):
    code, out, err = run_cli(capsys, "merge", "--base", tiny_sd15_path, "--adapter", f"{good['lokr']}:{scale}",
                             "--out", tmp_path / "merged")
    assert code == 2 and "finite" in err and scale in err and "lokr.safetensors" in err
    assert "Traceback" not in out + err and _listing(tmp_path) == []


def test_merge_refuses_nonfinite_result(good, tiny_sd15_path, tmp_path, capsys):
    """A finite scale whose update overflows float32 leaves no NaN model behind."""
    big = _edit(good["lokr"], tmp_path / "big.safetensors", W, _set("lokr_w1", lambda v: v * 1e30))
    code, out, err = run_cli(capsys, "merge", "--base", tiny_sd15_path, "--adapter", f"{big}:1e10",
                             "--out", tmp_path / "merged.safetensors")
    assert code == 2 and "non-finite" in err and "big.safetensors" in err and "nothing was written" in err
    assert _listing(tmp_path) == ["big.safetensors"]


def test_finite_scale_check():
    from lokr_diffusion.loading import finite_scale

    assert finite_scale("scale", 2) == 2.0
    for bad in (NAN, INF, "x", None, True):
        with pytest.raises(ConfigError):
            finite_scale("scale", bad)
    assert math.isfinite(finite_scale("scale", torch.tensor(0.5)))


def test_one_peft_reader():
    """loading's PEFT translation is the tools' one (no second regex to drift)."""
    from lokr_diffusion import loading

    assert loading.from_peft is peft.from_peft
    assert peft.split_peft_key("base_model.model.down_blocks.0.attn1.to_q.lokr_w2_a.default") == \
        ("down_blocks.0.attn1.to_q", "lokr_w2_a")
    assert peft.split_peft_key("lora_unet_x.alpha") is None
    assert peft.is_peft_layout(["base_model.model.a.lokr_w1"]) and not peft.is_peft_layout(["lora_unet_a.lokr_w1"])


def test_load_adapter_refuses_every_case(good, tiny_sd15_path, tmp_path):
    """The same files through load_adapter: the project's error, nothing attached."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, **SD_KW)
    for i, (case, (make, _)) in enumerate(CASES.items()):
        folder = tmp_path / str(i)
        folder.mkdir()
        with pytest.raises(AdapterFileError):
            load_adapter(pipe, make(good, folder), strict=True)
    assert list_adapters(pipe) == {}
