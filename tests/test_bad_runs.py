"""Bad runs, made here: untrusted or damaged checkpoints, unusable output folders, a second run
on the same folder, signals, a full disk, closed pipes. Each case checks the exit code, a
message naming the problem, that no traceback is printed, and that nothing outside the run's
own files changed."""
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lokr_diffusion import cli
from lokr_diffusion.errorhandling import run_guarded
from lokr_diffusion.training import checkpoint
from lokr_diffusion.training.lock import LOCK_NAME, acquire
from lokr_diffusion.training.loop import main as train_main

from .helpers import wait_for
from .test_train import ROOT, train_here, write_config

pytestmark = pytest.mark.slow

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
FAST = {"logging": {"tensorboard": False}}


def _config(folder: Path, model, **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    merged = {k: dict(v) for k, v in FAST.items()}
    for k, v in sections.items():
        merged.setdefault(k, {}).update(v)
    return write_config(folder, model, **merged)


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """name -> (size, mtime_ns) of every file under root outside `skip` (the run's own folder)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        st = p.lstat()  # folders: presence only (the run's lock file comes and goes in the output folder)
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns) if p.is_file() else (0, 0)
    return out


def _no_traceback(log: str) -> None:
    assert "Traceback" not in log, log[-3000:]


# -- checkpoints ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_sd15_path, tmp_path_factory):
    """A 2-step run that saved checkpoints at steps 1 and 2 (template: tests copy it)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = _config(root, tiny_sd15_path, train={"max_steps": 2}, output={"save_every_steps": 1})
    assert train_main(["--config", str(cfg)]) == 0
    return root / "out"


def _copy(trained: Path, tmp_path: Path, model, **sections) -> tuple[Path, Path]:
    """A copy of the trained folder and a config that resumes it for one more step."""
    sections.setdefault("train", {})
    sections["train"] = {"max_steps": 3, "resume": "latest", **sections["train"]}
    cfg = _config(tmp_path, model, **sections)
    shutil.copytree(trained, tmp_path / "out")
    return cfg, tmp_path / "out"


class _Payload:
    """Unpickling this runs `touch marker`: the attack a checkpoint folder from a stranger can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"progress": _Payload(marker)}, path)


def test_pickle_in_custom_checkpoint_is_never_loaded(trained, tiny_sd15_path, tmp_path, capsys):
    cfg, out = _copy(trained, tmp_path, tiny_sd15_path)
    marker = tmp_path / "pwned"
    _plant(out / "checkpoints" / "step-000002" / "custom_checkpoint_0.pkl", marker)
    code, log = train_here(capsys, cfg)
    assert code == 0, log[-3000:]
    assert not marker.exists()
    assert "unexpected file(s) custom_checkpoint_0.pkl" in log and "resumed from" in log and "step-000001" in log
    _no_traceback(log)


def test_pickle_as_random_states_is_never_loaded(trained, tiny_sd15_path, tmp_path, capsys):
    cfg, out = _copy(trained, tmp_path, tiny_sd15_path)
    marker = tmp_path / "pwned"
    _plant(out / "checkpoints" / "step-000002" / "random_states_0.pkl", marker)
    code, log = train_here(capsys, cfg)
    assert code == 0 and not marker.exists()
    assert "random_states_0.pkl" in log and "step-000001" in log
    _no_traceback(log)


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin"])
def test_pickle_with_a_forged_manifest_is_refused(name, trained, tiny_sd15_path, tmp_path, capsys):
    """The attacker rewrote the manifest too: the hashes match, weights_only loading still refuses."""
    cfg, out = _copy(trained, tmp_path, tiny_sd15_path)
    marker = tmp_path / "pwned"
    state = out / "checkpoints" / "step-000002"
    _plant(state / name, marker)
    manifest = json.loads((state / checkpoint.MANIFEST).read_text())
    manifest["files"][name] = {"size": (state / name).stat().st_size, "sha256": checkpoint._sha256(state / name)}
    (state / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    code, log = train_here(capsys, cfg)
    assert code == 2 and not marker.exists()
    assert f"{name}: cannot be loaded as plain tensors" in log
    _no_traceback(log)


@pytest.mark.parametrize("damage,needle", [
    ("truncate model.safetensors", "model.safetensors: "),
    ("empty optimizer.bin", "optimizer.bin: 0 bytes"),
    ("remove scheduler.bin", "missing scheduler.bin"),
    ("garble lokr_manifest.json", "unreadable manifest"),
    ("flip a byte of lokr_progress.json", "lokr_progress.json: contents differ"),
])
def test_damaged_newest_checkpoint_falls_back(damage, needle, trained, tiny_sd15_path, tmp_path, capsys):
    cfg, out = _copy(trained, tmp_path, tiny_sd15_path)
    state = out / "checkpoints" / "step-000002"
    verb, name = damage.split(" ", 1)
    f = state / name.split(" of ")[-1]
    if verb == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif verb == "empty":
        f.write_bytes(b"")
    elif verb == "remove":
        f.unlink()
    elif verb == "garble":
        f.write_bytes(b"{not json")
    else:
        data = bytearray(f.read_bytes())
        data[10] ^= 1
        f.write_bytes(bytes(data))
    code, log = train_here(capsys, cfg)
    assert code == 0, log[-3000:]
    assert "checkpoint step-000002 is damaged" in log and needle in log
    assert "resuming from step-000001, the newest intact checkpoint" in log and "at step 1" in log
    _no_traceback(log)


def test_no_intact_checkpoint_is_an_error(trained, tiny_sd15_path, tmp_path, capsys):
    cfg, out = _copy(trained, tmp_path, tiny_sd15_path)
    for state in (out / "checkpoints").iterdir():
        (state / "optimizer.bin").write_bytes(b"")
    before = snapshot(tmp_path)
    code, log = train_here(capsys, cfg)
    assert code == 2 and "no intact checkpoint in" in log and "train.resume = false" in log
    assert snapshot(tmp_path) == before
    _no_traceback(log)


@pytest.mark.parametrize("override,needle", [
    ({"network": {"factor": 8}}, "network.factor is 4 in the checkpoint, 8 in this run"),
    ({"network": {"algo": "loha"}}, "network.algo is 'lokr' in the checkpoint, 'loha' in this run"),
    ({"train": {"batch_size": 1}}, "train.batch_size is 2 in the checkpoint, 1 in this run"),
])
def test_checkpoint_of_another_config_is_refused(override, needle, trained, tiny_sd15_path, tmp_path, capsys):
    cfg, out = _copy(trained, tmp_path, tiny_sd15_path, **override)
    before = snapshot(tmp_path)
    code, log = train_here(capsys, cfg)
    assert code == 2, log[-3000:]
    assert "was saved by a run with another config" in log and needle in log
    assert snapshot(tmp_path) == before  # the refusal changed nothing
    _no_traceback(log)


def test_checkpoint_of_another_base_model_is_refused(trained, tiny_sd15_path, tiny_sd2_path, tmp_path, capsys):
    cfg, _ = _copy(trained, tmp_path, tiny_sd2_path)
    code, log = train_here(capsys, cfg)
    assert code == 2 and "base model is" in log and str(tiny_sd2_path) in log
    _no_traceback(log)


def _folder_with(folder: Path, name: str) -> Path:
    folder.mkdir()
    (folder / name).write_text("hi")
    return folder


@pytest.mark.parametrize("make,needle", [
    (lambda d: _folder_with(d / "folder", "notes.txt"), "no lokr_manifest.json (not a complete checkpoint"),
    (lambda d: d / "nowhere", "is not a checkpoint folder"),
])
def test_resume_from_a_folder_that_is_not_a_checkpoint(make, needle, tiny_sd15_path, tmp_path, capsys):
    target = make(tmp_path)
    cfg = _config(tmp_path, tiny_sd15_path, train={"max_steps": 2, "resume": str(target)})
    code, log = train_here(capsys, cfg)
    assert code == 2 and needle in log and str(target) in log
    _no_traceback(log)


def test_checkpoint_of_an_older_version_is_named(trained, tiny_sd15_path, tmp_path, capsys):
    cfg, out = _copy(trained, tmp_path, tiny_sd15_path)
    for state in (out / "checkpoints").iterdir():
        (state / checkpoint.MANIFEST).unlink()
        torch.save({"step": 1}, state / "custom_checkpoint_0.pkl")
    code, log = train_here(capsys, cfg)
    assert code == 2 and "older version of lokr-diffusion" in log
    _no_traceback(log)


# -- temporaries ------------------------------------------------------------------------------------

def test_only_stale_temporaries_of_this_project_are_removed(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / "step-000004.lokr-999999999.tmp").mkdir(parents=True)
    (out / "checkpoints" / "step-000005.tmp").mkdir()  # older versions' temp state folder
    (out / "samples").mkdir()
    (out / "samples" / ".a.png.x1y2.lokr-999999999.tmp").write_bytes(b"half")  # writer gone
    live = out / f".b.json.zz.lokr-{os.getppid()}.tmp"  # writer (pytest's parent) still running
    live.write_bytes(b"live")
    users = [out / ".x.tmp", out / "samples" / ".notes.tmp", out / "checkpoints" / ".mine.tmp"]
    for f in users:
        f.write_text("the user's")
    (out / ".folder.tmp").mkdir()
    assert checkpoint.remove_stale_temporaries(out) == 3
    assert all(f.read_text() == "the user's" for f in users) and live.exists() and (out / ".folder.tmp").is_dir()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".mine.tmp"]


def test_users_tmp_files_survive_a_run(tiny_sd15_path, tmp_path, capsys):
    """With [sample] on and TensorBoard off (that combination crashed at the first sample step)."""
    cfg = _config(tmp_path, tiny_sd15_path, train={"max_steps": 2},
                  sample={"prompts": ["x"], "every_steps": 1, "steps": 2, "num_images": 1, "width": 64, "height": 64})
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / ".x.tmp").write_text("mine")
    (out / "samples" / ".draft.tmp").write_text("mine too")
    (out / "checkpoints" / "step-000009.lokr-999999999.tmp").mkdir(parents=True)
    code, log = train_here(capsys, cfg)
    assert code == 0, log[-3000:]
    assert (out / ".x.tmp").read_text() == "mine" and (out / "samples" / ".draft.tmp").read_text() == "mine too"
    assert not (out / "checkpoints" / "step-000009.lokr-999999999.tmp").exists()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step000001-00-x.png", "step000002-00-x.png"]
    assert not (out / LOCK_NAME).exists()  # released at the end
    _no_traceback(log)


# -- output folders ---------------------------------------------------------------------------------

def _bad_output(tmp_path, capsys, out_dir: str) -> tuple[int, str, bool]:
    """Run with output.dir = out_dir; also says whether anything under tmp_path changed."""
    cfg = _config(tmp_path, tmp_path / "no-such-model", output={"dir": out_dir})
    cfg.write_text(cfg.read_text().replace("\0", "\\u0000"))  # TOML's escape for a NUL
    before = snapshot(tmp_path)
    code, log = train_here(capsys, cfg)
    return code, log, snapshot(tmp_path) == before


def test_output_dir_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    code, log, unchanged = _bad_output(tmp_path, capsys, str(tmp_path / "out"))
    assert code == 2 and "exists and is a file, not a folder" in log and unchanged
    _no_traceback(log)


def test_output_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("a file")
    code, log, unchanged = _bad_output(tmp_path, capsys, str(tmp_path / "f" / "out"))
    assert code == 2 and f"{tmp_path / 'f'} is a file, not a folder" in log and unchanged
    _no_traceback(log)


def test_output_dir_with_nul(tmp_path, capsys):
    code, log, unchanged = _bad_output(tmp_path, capsys, str(tmp_path / "a\0b"))
    assert code == 2 and "NUL character" in log and unchanged
    _no_traceback(log)


def test_output_dir_not_writable(tmp_path, capsys):
    """chmod does not stop root, so use a place no one may create folders in (sysfs), or a
    0o555 folder when not root."""
    if os.geteuid() == 0:
        target = "/sys/lokr-diffusion-test-out"
        try:
            os.mkdir(target)
        except OSError:
            pass
        else:
            os.rmdir(target)
            pytest.skip("running as root on a system where /sys is writable: no unwritable folder to test")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        target = str(ro / "out")
    code, log, _ = _bad_output(tmp_path, capsys, target)
    assert code == 2 and "cannot write there" in log and target in log
    _no_traceback(log)


def test_tiny_model_out_is_an_existing_file(tmp_path, capsys):
    f = tmp_path / "model"
    f.write_text("keep me")
    assert cli.main(["tiny-model", "--out", str(f)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "exists and is a file" in err and f.read_text() == "keep me"
    _no_traceback(err)


# -- locks ------------------------------------------------------------------------------------------

_HOLD = "import sys, time; from lokr_diffusion.training.lock import acquire; acquire(sys.argv[1]); print('locked', flush=True); time.sleep(600)"


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of tmp_path/out."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "out")], env=ENV, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_second_run_on_a_locked_folder_is_refused(holder, tiny_sd15_path, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_sd15_path)
    before = snapshot(tmp_path)
    code, log = train_here(capsys, cfg)
    assert code == 2 and "is in use by another training run" in log and f"pid {holder.pid}" in log
    assert socket.gethostname() in log and "--break-lock" in log
    assert snapshot(tmp_path) == before  # the holder's lock is untouched
    _no_traceback(log)


def test_break_lock_flag_takes_a_live_lock(holder, tmp_path, capsys):
    cfg = _config(tmp_path, tmp_path / "no-such-model")
    code, log = train_here(capsys, cfg, "--break-lock")
    assert "breaking the lock" in log and f"pid {holder.pid}" in log
    assert code == 2 and "no-such-model" in log  # it went on, up to the missing model
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # and released its own lock on the way out


def test_stale_lock_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                             "started": "2020-01-01T00:00:00"}))
    cfg = _config(tmp_path, tmp_path / "no-such-model")
    code, log = train_here(capsys, cfg)
    assert f"taking over the stale lock of {out}" in log and f"pid {dead.pid}" in log
    assert code == 2 and "no-such-model" in log
    assert not (out / LOCK_NAME).exists()


def test_lock_of_another_host_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "2020-01-01"}))
    code, log = train_here(capsys, _config(tmp_path, tmp_path / "no-such-model"))
    assert code == 2 and "host elsewhere.example" in log and "on another host" in log
    _no_traceback(log)


def test_same_process_cannot_run_twice_on_one_folder(tmp_path, capsys):
    lock = acquire(tmp_path / "out")
    try:
        code, log = train_here(capsys, _config(tmp_path, tmp_path / "no-such-model"))
    finally:
        lock.release()
    assert code == 2 and f"pid {os.getpid()}" in log and "still running" in log


# -- signals, disk full, pipes (subprocesses) ---------------------------------------------------------

def _start(config: Path, *extra: str, **kw) -> subprocess.Popen:
    kw.setdefault("env", ENV)
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, **kw)


def _intact_states(out: Path) -> list[str]:
    names = []
    for step, path in checkpoint.complete_states(out):
        checkpoint.check_checkpoint(path, None)  # raises if any folder is half written
        names.append(path.name)
    return names


def test_one_sigint_saves_and_resume_continues(tiny_sd15_path, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_sd15_path, train={"max_steps": 500})
    out = tmp_path / "out"
    proc = _start(cfg)
    assert wait_for(lambda: (out / "config.json").exists(), proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 3, log[-3000:]
    assert "stopped by signal 2" in log and "--set train.resume=latest" in log
    _no_traceback(log)
    states = _intact_states(out)
    assert states and not list(out.rglob("*.lokr-*.tmp")) and not (out / LOCK_NAME).exists()
    step = int(states[-1].split("-")[1])
    code, log = train_here(capsys, cfg, "--set", "train.resume=latest", "--set", f"train.max_steps={step + 1}")
    assert code == 0 and f"at step {step}" in log, log[-3000:]


@pytest.mark.parametrize("gap", [0.0, 0.05])
def test_second_sigint_never_leaves_a_half_checkpoint(gap, tiny_sd15_path, tmp_path):
    """A checkpoint every step, two signals `gap` apart (the launcher-duplicate window switched off
    with LOKR_DIFFUSION_SIGNAL_WINDOW=0): whether the second lands in a step or in a save, every
    step folder left is complete."""
    cfg = _config(tmp_path, tiny_sd15_path, train={"max_steps": 500}, output={"save_every_steps": 1})
    out = tmp_path / "out"
    proc = _start(cfg, env=dict(ENV, LOKR_DIFFUSION_SIGNAL_WINDOW="0"))
    assert wait_for(lambda: len(checkpoint.complete_states(out)) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(gap)
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode in (3, 130), log[-3000:]
    assert "stopped by signal 2" in log or "interrupted" in log
    _no_traceback(log)
    assert len(_intact_states(out)) >= 2  # every step folder is complete and verifies
    assert not list(out.rglob("*.lokr-*.tmp")) and not (out / LOCK_NAME).exists()


def test_disk_full_during_a_checkpoint_keeps_no_half_checkpoint(tiny_sd15_path, tmp_path):
    """A file size limit between the adapter's size and the optimizer state's: the state write fails
    inside save_state, as it would on a full disk."""
    cfg = _config(tmp_path, tiny_sd15_path, train={"max_steps": 2}, output={"save_every_steps": 1})

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    proc = _start(cfg, preexec_fn=limit)
    log = proc.communicate(timeout=300)[0]
    out = tmp_path / "out"
    assert proc.returncode == 2, log[-3000:]
    assert "cannot write the checkpoint" in log and "step-000001" in log
    _no_traceback(log)
    assert not (out / "checkpoints" / "step-000001").exists() and not list(out.rglob("*.lokr-*.tmp"))
    assert not (out / LOCK_NAME).exists()


def test_inspect_into_a_closed_pipe(trained):
    proc = subprocess.Popen([sys.executable, "-m", "lokr_diffusion.cli", "inspect", str(trained / "t.safetensors"), "-v"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # like `| head` exiting before the first line
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 141 and "Traceback" not in err and "Exception ignored" not in err, err


# -- the handler itself ----------------------------------------------------------------------------

def test_real_disk_full_is_one_line(capsys):
    def write():
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 10)

    assert run_guarded("prog", write) == 1
    err = capsys.readouterr().err
    assert err.strip() == "prog: error: no space left on the device (free some space and run again)"


def test_unexpected_exception_is_reported_as_a_bug(capsys):
    assert run_guarded("prog", lambda: {}["missing"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "this is a bug in lokr-diffusion" in err
