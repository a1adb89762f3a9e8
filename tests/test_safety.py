"""Nothing a user owns is ever lost, and every fault ends in one line (issue: safe by construction).

Each test provokes one class of fault through the command line and checks
the exit code, a single line without a traceback, and that every file that
existed before is byte-identical afterwards (and no temporary file is left).
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from mfnumba.api import RunControl, deconvolve
from mfnumba.cli import app
from mfnumba.errors import Interrupted
from mfnumba.options import Options
from mfnumba.runfiles import RunFiles
from mfnumba.simulate import SimConfig, simulate_stack, write_stack

runner = CliRunner()


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack")
    sim = simulate_stack(SimConfig(n_frames=4, shape=(48, 48), n_stars=8, seed=5))
    write_stack(sim, d)
    return d


@pytest.fixture
def stack(stack_dir, tmp_path):
    """A private copy of the stack (tests may rename or damage files)."""
    shutil.copytree(stack_dir, tmp_path / "s")
    return tmp_path / "s"


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _deconv(stack, out, *extra):
    return _run("deconv", stack / "frames", "--psf", stack / "psfs", "-o", out, "--iters", 6,
                "--no-early-stop", "-q", *extra)


def _one_line_error(res, *needles, code=2):
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def _unchanged(root: Path, before: dict, allowed_new=()):
    after = _tree(root)
    for name, digest in before.items():
        assert after.get(name) == digest, f"{name} was changed or removed"
    new = set(after) - set(before) - set(allowed_new)
    assert not new, f"files left behind: {sorted(new)}"


# ownership ---------------------------------------------------------------------------------
def test_json_log_onto_an_input_frame_is_refused(stack, tmp_path):
    before = _tree(tmp_path)
    frame = stack / "frames" / "frame_001.fits"
    res = _deconv(stack, tmp_path / "o.fits", "--json-log", frame, "--overwrite")
    _one_line_error(res, "frame_001.fits", "input")
    _unchanged(tmp_path, before)


def test_json_log_onto_a_file_mfnumba_did_not_make_is_refused(stack, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my observing notes\n")
    before = _tree(tmp_path)
    res = _deconv(stack, tmp_path / "o.fits", "--json-log", notes, "--overwrite")
    _one_line_error(res, "notes.txt", "not an mfnumba log")
    _unchanged(tmp_path, before)


def test_json_log_that_is_a_folder_is_refused_at_once(stack, tmp_path):
    res = _deconv(stack, tmp_path / "o.fits", "--json-log", str(tmp_path) + os.sep)
    _one_line_error(res, "directory")


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_output_may_not_be_an_input_even_with_overwrite(stack, tmp_path, how):
    frame = stack / "frames" / "frame_002.fits"
    out = frame
    if how == "symlink":
        out = tmp_path / "link.fits"
        out.symlink_to(frame)
    elif how == "hard link":
        out = tmp_path / "hard.fits"
        os.link(frame, out)
    before = _tree(tmp_path)
    res = _deconv(stack, out, "--overwrite")
    _one_line_error(res, "input")
    _unchanged(tmp_path, before)


def test_psf_and_seed_files_are_inputs_too(stack, tmp_path):
    seed = tmp_path / "seed.fits"
    fits.writeto(seed, fits.getdata(stack / "frames" / "frame_000.fits").astype(np.float32))
    before = _tree(tmp_path)
    res = _deconv(stack, seed, "--seed", seed, "--overwrite")
    _one_line_error(res, "seed.fits", "input")
    res = _deconv(stack, stack / "psfs" / "psf_000.fits", "--overwrite")
    _one_line_error(res, "psf_000.fits", "input")
    _unchanged(tmp_path, before)


def test_products_inside_the_frames_folder_are_not_read_back(stack, caplog):
    frames = stack / "frames"
    res = _deconv(stack, frames / "result.fits", "--save-every", "3")
    assert res.exit_code == 0, res.output
    assert (frames / "result.iter0003.fits").exists()
    res = _run("deconv", frames, "--psf", stack / "psfs", "-o", stack / "again.fits", "--iters", 2)
    assert res.exit_code == 0, res.output
    assert "skipping 3 file(s) written by mfnumba" in res.output
    assert fits.getheader(stack / "again.fits")["MF_NFRM"] == 4


def test_an_existing_snapshot_that_is_not_ours_is_never_replaced(stack, tmp_path):
    mine = tmp_path / "o.iter0003.fits"
    fits.writeto(mine, np.zeros((4, 4), np.float32))
    before = _tree(tmp_path)
    res = _deconv(stack, tmp_path / "o.fits", "--save-every", "3", "--overwrite")
    _one_line_error(res, "o.iter0003.fits")
    _unchanged(tmp_path, before)


def test_cleanup_removes_only_this_outputs_checkpoints(stack, tmp_path):
    """Glob metacharacters in the name are literal: '[ab].fits' must not match 'a.fits'."""
    other = tmp_path / "a.fits.ckpt.npz"
    other.write_bytes(b"someone else's checkpoint")
    before = _tree(tmp_path)
    res = _deconv(stack, tmp_path / "[ab].fits")
    assert res.exit_code == 0, res.output
    _unchanged(tmp_path, before, allowed_new={"[ab].fits"})


# names -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["light_é0.fits", "a:b:c [bold]x[red] :smile:.fits",
                                  "new\nline $HOME *.fits"])
def test_any_file_name_works_and_is_printed_literally(stack, tmp_path, name):
    frames = stack / "frames"
    first = sorted(frames.iterdir())[0]
    first.rename(frames / name)
    out = tmp_path / f"out {name}"
    res = _run("deconv", frames, "--fwhm", 3, "-o", out, "--iters", 3)
    assert res.exit_code == 0, res.output
    shown = name.replace("\n", "\\x0a")  # control characters are escaped, nothing else
    assert shown in res.output  # the notes name the frame literally
    hdr = fits.getheader(out)
    history = "".join(str(v) for v in hdr["HISTORY"])
    from mfnumba.provenance import ascii_text

    escaped = ascii_text(name)
    assert escaped.isascii() and "\n" not in escaped
    assert escaped in history.replace(" ", "") or escaped.replace(" ", "") in history.replace(" ", "")
    # a bad path with the same name: the one-line error shows it unchanged
    res = _run("deconv", tmp_path / "missing" / name, "--fwhm", 3, "-o", tmp_path / "x.fits")
    _one_line_error(res, shown)


def test_long_history_is_split_not_cut(stack, tmp_path):
    frames = stack / "frames"
    long = "L" * 90 + ".fits"
    sorted(frames.iterdir())[0].rename(frames / long)
    out = tmp_path / "o.fits"
    res = _run("deconv", frames, "--fwhm", 3, "-o", out, "--iters", 2, "-q")
    assert res.exit_code == 0, res.output
    hdr = fits.getheader(out)
    history = "".join(str(v) for v in hdr["HISTORY"])
    assert long in history and "Moffat FWHM 3 px" in history
    assert "command: mfnumba" in history or "command:" in history
    assert "DATE" in hdr and hdr["MF_VERS"]


def test_output_of_an_unwritten_format_is_refused(stack, tmp_path):
    res = _deconv(stack, tmp_path / "o.xisf")
    _one_line_error(res, "o.xisf", "FITS")
    assert not (tmp_path / "o.xisf").exists()


# checkpoints -----------------------------------------------------------------------------
def _interrupted_checkpoint(stack, out, stop=2):
    def progress(rec):
        if rec.iteration == stop:
            raise KeyboardInterrupt

    frames = sorted((stack / "frames").iterdir())
    with pytest.raises(Interrupted):
        deconvolve(frames, stack / "psfs", options=Options(iters=6, early_stop=False),
                   progress=progress, control=RunControl(checkpoint=out))
    ck = out.with_name(out.name + ".ckpt.npz")
    assert ck.exists()
    return ck


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "negative"])
def test_a_bad_checkpoint_is_refused_in_one_line(stack, tmp_path, damage):
    out = tmp_path / "o.fits"
    ck = _interrupted_checkpoint(stack, out)
    if damage == "garbage":
        ck.write_bytes(b"not a zip file at all")
    elif damage == "truncated":
        ck.write_bytes(ck.read_bytes()[:300])
    elif damage == "foreign":
        np.savez(open(ck, "wb"), weights=np.ones(3))
    else:
        with np.load(ck) as z:
            data = {k: z[k] for k in z.files}
        data["x"] = -data["x"]
        np.savez(open(ck, "wb"), **data)
    before = _tree(tmp_path)
    res = _deconv(stack, out, "--resume")
    _one_line_error(res, ck.name)
    _unchanged(tmp_path, before)


def test_resume_after_a_frame_changed_is_refused_naming_it(stack, tmp_path):
    out = tmp_path / "o.fits"
    _interrupted_checkpoint(stack, out)
    frame = stack / "frames" / "frame_002.fits"
    with fits.open(frame) as hdul:
        data, hdr = hdul[0].data.copy(), hdul[0].header.copy()
    data[10, 10] += 1.0
    fits.writeto(frame, data, hdr, overwrite=True)
    before = _tree(tmp_path)
    res = _deconv(stack, out, "--resume")
    _one_line_error(res, "frame_002.fits", "changed")
    res = _deconv(stack, out, "--resume", "--kappa", "1.5")
    _one_line_error(res, "kappa")
    _unchanged(tmp_path, before)


def test_resume_with_fewer_iterations_than_done_is_refused(stack, tmp_path):
    out = tmp_path / "o.fits"
    _interrupted_checkpoint(stack, out, stop=4)
    res = _run("deconv", stack / "frames", "--psf", stack / "psfs", "-o", out, "--iters", 3,
               "--no-early-stop", "--resume", "-q")
    _one_line_error(res, "--iters 3", "iteration 4")


def test_a_stale_checkpoint_is_kept_unless_resume_or_overwrite(stack, tmp_path):
    out = tmp_path / "o.fits"
    _interrupted_checkpoint(stack, out)
    before = _tree(tmp_path)
    _one_line_error(_deconv(stack, out), "--resume", "--overwrite")
    _unchanged(tmp_path, before)
    res = _deconv(stack, out, "--resume")
    assert res.exit_code == 0, res.output
    assert fits.getheader(out)["MF_ITERS"] == 6 and not list(tmp_path.glob("*.ckpt.npz"))


def test_min_iters_above_iters_is_refused():
    res = _run("deconv", "nowhere", "-o", "x.fits", "--iters", 3, "--min-iters", 5)
    _one_line_error(res, "--min-iters 5")


# faults ------------------------------------------------------------------------------------
def test_disk_full_at_a_checkpoint_write_is_one_line_and_leaves_nothing(stack, tmp_path,
                                                                        monkeypatch):
    import mfnumba.checkpoint as ck

    real = ck.np.savez

    def full(fh, **kw):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck.np, "savez", full)
    before = _tree(tmp_path)
    res = _deconv(stack, tmp_path / "o.fits")
    _one_line_error(res, "No space left on device", "checkpoint")
    _unchanged(tmp_path, before)
    monkeypatch.setattr(ck.np, "savez", real)


def test_a_small_disk_is_refused_before_the_run(stack, tmp_path):
    """A real 64 KiB tmpfs (when root may mount one): the output cannot fit; refused at once."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                        capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    if not ok:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    try:
        (mnt / "keep.txt").write_text("mine")
        res = _deconv(stack, mnt / "o.fits")
        _one_line_error(res, "not enough free space")
        assert sorted(p.name for p in mnt.iterdir()) == ["keep.txt"]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_read_only_output_folder_is_refused_at_once(stack, tmp_path):
    """A real read-only file system (root mounts one) or a 0555 folder (as a user)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
        capture_output=True).returncode == 0
    if not mounted:
        os.chmod(ro, 0o555)
        if os.access(ro, os.W_OK):
            pytest.skip("this user can write into a 0555 folder and cannot mount")
    try:
        res = _deconv(stack, ro / "o.fits")
        _one_line_error(res, "cannot write", "o.fits")
        assert not list(ro.iterdir())
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], capture_output=True)
        else:
            os.chmod(ro, 0o755)


def test_a_second_run_on_the_same_output_is_refused(stack, tmp_path):
    out = tmp_path / "o.fits"
    first = RunFiles(out)
    first.acquire()  # a run in progress
    try:
        res = _deconv(stack, out)
        _one_line_error(res, "another mfnumba run", str(os.getpid()))
        assert not out.exists()
    finally:
        first.release()
    assert not first.lock_path.exists()
    assert _deconv(stack, out).exit_code == 0


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_saves_a_checkpoint_removes_scratch_and_exits(tmp_path, sig, code):
    sim = simulate_stack(SimConfig(n_frames=4, shape=(160, 160), n_stars=20, trail_frames=(),
                                   seed=3))
    write_stack(sim, tmp_path / "s")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out, log = tmp_path / "o.fits", tmp_path / "run.jsonl"
    env = dict(os.environ, TMPDIR=str(scratch))
    cmd = [sys.executable, "-m", "mfnumba.cli", "deconv", str(tmp_path / "s" / "frames"), "--psf",
           str(tmp_path / "s" / "psfs"), "-o", str(out), "--iters", "400", "--no-early-stop",
           "--low-mem", "--json-log", str(log), "-q"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and sum('"iteration"' in ln for ln in log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert list(scratch.iterdir()), "the run should stream through scratch files"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "checkpoint saved" in lines[0] and "Traceback" not in err
    assert signal.Signals(sig).name in lines[0]
    assert out.with_name("o.fits.ckpt.npz").exists() and not out.exists()
    assert not list(scratch.iterdir()), "scratch files were left behind"
    assert not out.with_name("o.fits.lock").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    events = [json.loads(ln)["event"] for ln in log.read_text().splitlines()]
    assert events[0] == "start"


# preflight ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--backend", "cuda"], "--backend cuda"),
    (["--seed", "missing_seed.fits"], "missing_seed.fits"),
    (["--json-log", "no_such_folder/run.jsonl"], "does not exist"),
    (["-o", "no_such_folder/o.fits"], "does not exist"),
    (["--fwhm", "-1"], "--fwhm"),
])
def test_bad_options_are_refused_before_any_heavy_work(stack, tmp_path, monkeypatch, args, needle):
    import mfnumba.api as api
    import mfnumba.prepare as prepare

    def heavy(*a, **k):
        raise AssertionError("heavy work started before the options were checked")

    monkeypatch.setattr(api, "deconvolve", heavy)
    monkeypatch.setattr(prepare, "stack_psfs", heavy)
    monkeypatch.chdir(tmp_path)
    base = ["deconv", str(stack / "frames"), "-o", "o.fits", "--iters", "3", "-q"]
    if "--fwhm" not in args:
        base += ["--psf", str(stack / "psfs")]
    if "-o" in args:
        base = [a for a in base if a not in ("-o", "o.fits")]
    res = runner.invoke(app, base + args)
    _one_line_error(res, needle)


def test_resume_keeps_the_earlier_runs_snapshots(stack, tmp_path):
    """Snapshots written before the interruption are ours and are not in the way of --resume."""
    out = tmp_path / "o.fits"
    frames = sorted((stack / "frames").iterdir())

    def progress(rec):
        if rec.iteration == 4:
            raise KeyboardInterrupt

    from mfnumba.runfiles import RunFiles as RF

    files = RF(out)

    def snap(it, ch, img):
        hdr = fits.Header({"MFSNAP": True})
        fits.writeto(files.snapshot_path(it, ch), img, hdr)

    with pytest.raises(Interrupted):
        deconvolve(frames, stack / "psfs", options=Options(iters=6, early_stop=False),
                   progress=progress, control=RunControl(checkpoint=out, save_every=2,
                                                         snapshot=snap))
    first = (tmp_path / "o.iter0002.fits").read_bytes()
    res = _deconv(stack, out, "--resume", "--save-every", "2")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o.iter0002.fits").read_bytes() == first
    assert (tmp_path / "o.iter0006.fits").exists()


def test_a_signal_inside_the_kernels_is_raised_between_batches():
    """A signal while the solver is in its numeric loop waits for the next batch boundary."""
    import signal as sg

    from mfnumba import interrupt
    from mfnumba.errors import Terminated

    with interrupt.handle():
        with pytest.raises(Terminated) as err:
            with interrupt.deferred():
                os.kill(os.getpid(), sg.SIGTERM)
                time.sleep(0.05)  # the handler has run: it only recorded the signal
                reached = True
        assert reached and err.value.signum == sg.SIGTERM
        os.kill(os.getpid(), sg.SIGTERM)  # the first signal counts, later ones are ignored
    with pytest.raises(KeyboardInterrupt):
        with interrupt.handle():
            os.kill(os.getpid(), sg.SIGINT)
            time.sleep(0.05)


def test_a_file_that_only_looks_like_our_lock_is_never_touched(stack, tmp_path):
    lock = tmp_path / "o.fits.lock"
    lock.write_text("my notes about the lock of the observatory door\n")
    before = _tree(tmp_path)
    _one_line_error(_deconv(stack, tmp_path / "o.fits"), "o.fits.lock", "not an mfnumba lock")
    _unchanged(tmp_path, before)


def test_rejection_maps_are_written_and_never_replace_other_files(stack, tmp_path):
    rej = tmp_path / "rej"
    res = _deconv(stack, tmp_path / "o.fits", "--save-rejection", rej)
    assert res.exit_code == 0, res.output
    maps = sorted(p.name for p in rej.iterdir())
    assert maps == [f"frame_00{i}_rej.fits" for i in range(4)]
    assert all(0 <= fits.getheader(rej / m)["MF_REJ"] < 0.5 for m in maps)
    hdr = fits.getheader(tmp_path / "o.fits")
    assert hdr["MF_REJ"] == "consensus" and hdr["MF_STOP"] in ("chi2", "iters", "settled")
    (rej / "frame_001_rej.fits").write_bytes(b"my own file")
    before = _tree(tmp_path)
    _one_line_error(_deconv(stack, tmp_path / "o2.fits", "--save-rejection", rej, "--overwrite"),
                    "frame_001_rej.fits")
    _unchanged(tmp_path, before)
