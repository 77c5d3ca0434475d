"""Pinned behaviour: SHA-256 hashes of the adapter files the trainer writes, for fixed seeds.

Why: the package is about to be restructured. A refactor that is meant to keep behaviour must
leave every trained file bit for bit the same, so this test trains 9 tiny runs (families
sd15, sd2 (v-prediction), sdxl x algorithms lokr, loha, lora) through the public entry point
`train.py --config <toml>`, which survives any reshuffle of the modules behind it, and compares
two hashes per final adapter `.safetensors` with the ones in `tests/data/behaviour_hashes.json`.

The test runs train.py in-process (`runpy` with argv ``--config <toml>``) because a subprocess
per run spends ~20 s importing torch and diffusers (3 minutes for the 9 cases, against ~30 s);
``--record`` runs each case both ways and checks they write identical files. The two hashes:

* ``tensors``: every tensor's name, dtype, shape and raw bytes, read straight from the file;
* ``metadata``: the safetensors ``__metadata__`` after `normalise_metadata` drops the fields
  that change between two identical runs (wall-clock times) and replaces the run's own paths
  with placeholders (see `VOLATILE_KEYS` and `path_placeholders`).

The runs are pinned to the CPU (``ACCELERATE_USE_CPU``, ``CUDA_VISIBLE_DEVICES=""``), one thread, and save fp32 so
that any change in the arithmetic shows. Hashes are exact, so they are tied to this software
stack (torch, diffusers, transformers versions and CPU kernels): a dependency upgrade that
changes floating-point results fails this test too; that is a re-record, not a bug, once the
change is understood.

When re-recording is legitimate: only when a change is *meant* to alter what the trainer
writes (new or renamed tensors or metadata keys, a different initialisation, a fixed bug in the
maths, a dependency upgrade as above), and the commit message says so and why. Never re-record
to make a refactor pass: a refactor that changes these hashes changed behaviour. To re-record::

    PYTHONPATH=$PWD python -m tests.test_behaviour_hashes --record

which trains every case twice (once as a `python train.py` subprocess, once in-process as the
test does, in different temporary folders with separate tiny-model copies), refuses to write
anything if the two runs of a case disagree (so a newly non-deterministic field is caught, not
pinned), and rewrites the JSON file (about 4 minutes). Recording is deliberately a separate,
explicit command rather than a pytest switch, so a test run can never rewrite its own answers.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import runpy
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from .test_train import write_config

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "train.py"
HASHES_FILE = Path(__file__).resolve().parent / "data" / "behaviour_hashes.json"

FAMILIES = ("sd15", "sd2", "sdxl")
ALGOS = ("lokr", "loha", "lora")
CASES = [(family, algo) for family in FAMILIES for algo in ALGOS]

# Per-algorithm [network] keys. Every case trains the UNet and the text encoder(s) with the
# "full" preset plus conv_dim, so Linear layers, 1x1 convs and k x k convs all get modules.
NETWORK: dict[str, dict[str, Any]] = {
    "lokr": {"factor": 4, "dim": 4, "alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0},
    "loha": {"dim": 2, "alpha": 1.0, "conv_dim": 2, "conv_alpha": 1.0},
    "lora": {"dim": 4, "alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0},
}

# Metadata keys whose values are wall-clock times: they differ between two identical runs.
VOLATILE_KEYS = frozenset({"ss_training_started_at", "modelspec.date"})
# sshs_model_hash is the sha256 of the file's tensor bytes: pinned by the tensors hash already,
# so in the metadata only its correctness is recorded (it would otherwise couple the two hashes).
TENSOR_HASH_KEY = "sshs_model_hash"


# The environment every run gets: CPU only, one thread, no network. ACCELERATE_USE_CPU also works
# in-process, where CUDA_VISIBLE_DEVICES may come too late (torch may have seen the GPU already).
RUN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"}


def write_case_config(family: str, algo: str, model_dir: Path, work_dir: Path) -> Path:
    """The TOML of one case, written into `work_dir` (its output goes to `work_dir`/out).

    Two steps at batch 1 and 64 px keep a run at a few seconds; lr 1e-3 moves every factor
    (LoKr's and LoRA's zero-initialised halves included) far enough from its start that a change
    in the maths shows in the bytes; fp32 saving keeps every bit of it.
    """
    return write_config(
        work_dir, model_dir,
        network={"algo": algo, "preset": "full", "train_unet": True, "train_text_encoder": True, **NETWORK[algo]},
        train={"max_steps": 2, "batch_size": 1, "learning_rate": 1e-3, "text_encoder_lr": 5e-4, "seed": 1234,
               "lr_scheduler": "constant"},
        output={"name": "t", "save_dtype": "fp32"},
        logging={"tensorboard": False},
    )


def _adapter(work_dir: Path, label: str) -> Path:
    adapter = work_dir / "out" / "t.safetensors"
    assert adapter.exists(), f"{label}: training reported success but wrote no {adapter}"
    return adapter


def train_subprocess(family: str, algo: str, model_dir: Path, work_dir: Path) -> Path:
    """`python train.py --config <toml>` in a fresh interpreter: exactly what a user runs.

    About 20 s a run on a shared 2-core machine, nearly all of it importing torch and diffusers,
    so the test uses `train_in_process` and `--record` runs both to prove they write the same file.
    """
    cfg = write_case_config(family, algo, model_dir, work_dir)
    result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--config", str(cfg)], env=dict(os.environ, **RUN_ENV),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{family}/{algo} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return _adapter(work_dir, f"{family}/{algo}")


def train_in_process(family: str, algo: str, model_dir: Path, work_dir: Path) -> Path:
    """Run train.py itself as `__main__` in this interpreter, with `--config <toml>` as its argv.

    Going through the script (not an internal function) keeps the test valid whatever the
    refactor does behind `train.py`; about 3 s a run once the imports are paid.
    """
    cfg = write_case_config(family, algo, model_dir, work_dir)
    saved_argv, saved_env = sys.argv, {k: os.environ.get(k) for k in RUN_ENV}
    sys.argv = [str(TRAIN_SCRIPT), "--config", str(cfg)]
    os.environ.update(RUN_ENV)
    code: int | str | None = 0
    try:
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
    except SystemExit as exc:  # train.py ends with sys.exit(main())
        code = exc.code
    finally:
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert code in (0, None), f"{family}/{algo}: train.py exited with {code!r} (its output is in the captured log)"
    return _adapter(work_dir, f"{family}/{algo}")


def read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str], bytes]:
    """(tensor header entries, __metadata__, data section) parsed from the file's own bytes, so
    the hash depends on what was written and not on how a loader reinterprets it."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, raw[8 + header_len:]


def _update(digest: hashlib._Hash, chunk: bytes) -> None:
    """Length-prefixed update: no two different field sequences hash the same bytes."""
    digest.update(struct.pack("<Q", len(chunk)))
    digest.update(chunk)


def tensor_hashes(header: dict[str, Any], data: bytes) -> tuple[str, str]:
    """(layout hash over names, dtypes and shapes; full hash that adds each tensor's raw bytes).

    The layout hash lets a failure say whether the structure changed or only the values.
    """
    layout, full = hashlib.sha256(), hashlib.sha256()
    for name in sorted(header):
        entry = header[name]
        begin, end = entry["data_offsets"]
        desc = json.dumps([name, entry["dtype"], entry["shape"]]).encode()
        _update(layout, desc)
        _update(full, desc)
        _update(full, data[begin:end])
    return layout.hexdigest(), full.hexdigest()


def path_placeholders(work_dir: Path, model_dir: Path) -> list[tuple[str, str]]:
    """(path, placeholder) pairs, longest path first so a nested path is replaced whole.

    The run folder and the tiny model's folder are fresh temporary folders each time and the
    repository (the dataset lives there) differs per checkout, so none of them is behaviour.
    Today only ss_sd_model_name carries one (the model folder); replacing all three in every
    value keeps a path quoted anywhere (a config dump, a dataset summary) from failing the test
    on another machine while the key itself is still pinned.
    """
    pairs: dict[str, str] = {}
    for path, placeholder in ((work_dir, "<RUN_DIR>"), (model_dir, "<MODEL_DIR>"), (ROOT, "<REPO>")):
        for variant in {str(path), str(Path(path).resolve())}:
            pairs[variant] = placeholder
    return sorted(pairs.items(), key=lambda item: -len(item[0]))


def normalise_metadata(metadata: dict[str, str], tensor_bytes_hash: str,
                       placeholders: list[tuple[str, str]]) -> dict[str, str]:
    """The metadata with run-specific values removed or replaced (see the module docstring)."""
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if key in VOLATILE_KEYS:
            continue
        if key == TENSOR_HASH_KEY:
            value = "<matches tensor bytes>" if value == tensor_bytes_hash else f"<MISMATCH: {value}>"
        for path, placeholder in placeholders:
            value = value.replace(path, placeholder)
        out[key] = value
    return dict(sorted(out.items()))


def fingerprint(adapter: Path, work_dir: Path, model_dir: Path) -> dict[str, Any]:
    """What the JSON file records for one case."""
    header, metadata, data = read_safetensors(adapter)
    layout, tensors = tensor_hashes(header, data)
    meta = normalise_metadata(metadata, hashlib.sha256(data).hexdigest(), path_placeholders(work_dir, model_dir))
    return {"tensors": tensors, "tensor_layout": layout, "num_tensors": len(header),
            "metadata": hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest(),
            "metadata_fields": meta}


def describe_difference(expected: dict[str, Any], got: dict[str, Any]) -> str:
    """A failure message naming which of tensors / metadata differ, and which metadata keys."""
    lines = []
    if got["tensors"] != expected["tensors"]:
        what = ("values only (same names, dtypes and shapes)" if got["tensor_layout"] == expected["tensor_layout"]
                else f"layout changed ({expected['num_tensors']} -> {got['num_tensors']} tensors, or names/dtypes/shapes)")
        lines.append(f"tensors differ: {what}")
    if got["metadata"] != expected["metadata"]:
        old, new = expected["metadata_fields"], got["metadata_fields"]
        lines.append("metadata differs:")
        for key in sorted(old.keys() | new.keys()):
            if old.get(key) != new.get(key):
                lines.append(f"  {key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    lines.append("Re-record only if the change is meant to alter the files (see this module's docstring).")
    return "\n".join(lines)


def load_expected() -> dict[str, Any]:
    return json.loads(HASHES_FILE.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("family,algo", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_trained_adapter_matches_recorded_hashes(family: str, algo: str, tiny_pipeline_paths, tmp_path) -> None:
    expected = load_expected()["cases"][f"{family}/{algo}"]
    model_dir = Path(tiny_pipeline_paths[family])
    adapter = train_in_process(family, algo, model_dir, tmp_path)
    got = fingerprint(adapter, tmp_path, model_dir)
    assert (got["tensors"], got["metadata"]) == (expected["tensors"], expected["metadata"]), \
        f"{family}/{algo}: " + describe_difference(expected, got)


def record() -> int:
    """Train every case twice, in two different folders, once with `python train.py` in a
    subprocess and once in-process the way the test does; write the JSON only if all pairs agree.

    Two folders and two tiny-model copies show the normalisation removed every path; the two ways
    of running show the in-process shortcut the test takes writes what the CLI writes.
    """
    import torch

    from lokr_diffusion.families import get_family

    torch.set_num_threads(1)
    cases: dict[str, Any] = {}
    disagreements = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hash_models_") as models:
        copies = {(f, copy): Path(get_family(f).build_tiny(Path(models) / f"tiny_{f}_{copy}", seed=0))
                  for f in FAMILIES for copy in ("a", "b")}
        for family, algo in CASES:
            runs = []
            for copy, trainer in (("a", train_subprocess), ("b", train_in_process)):
                with tempfile.TemporaryDirectory(prefix=f"hash_{family}_{algo}_{copy}_") as work:
                    model_dir = copies[family, copy]
                    runs.append(fingerprint(trainer(family, algo, model_dir, Path(work)), Path(work), model_dir))
            key = f"{family}/{algo}"
            if runs[0] != runs[1]:
                disagreements.append(f"{key} (subprocess -> in-process): " + describe_difference(runs[0], runs[1]))
            cases[key] = runs[0]
            print(f"{key}: tensors {runs[0]['tensors'][:12]} metadata {runs[0]['metadata'][:12]}"
                  f"{'' if runs[0] == runs[1] else '  RUNS DISAGREE'}", file=sys.__stdout__, flush=True)
    print(f"{2 * len(CASES)} runs in {time.monotonic() - started:.0f} s", file=sys.__stdout__)
    if disagreements:
        print("nothing recorded: two runs of the same case disagree\n" + "\n".join(disagreements), file=sys.stderr)
        return 1
    HASHES_FILE.parent.mkdir(parents=True, exist_ok=True)
    doc = {"_about": "SHA-256 of the adapters tests/test_behaviour_hashes.py trains; rewrite only with "
                     "`python -m tests.test_behaviour_hashes --record` (see that module's docstring).",
           "cases": cases}
    HASHES_FILE.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {HASHES_FILE}", file=sys.__stdout__)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="train every case twice and rewrite the JSON file")
    args = parser.parse_args()
    if not args.record:
        parser.error("nothing to do: pass --record to rewrite tests/data/behaviour_hashes.json")
    sys.exit(record())
