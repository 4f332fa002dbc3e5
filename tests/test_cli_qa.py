"""The QA pass, through the real CLI: inputs that must never delete a user's files, never run two
writers on one folder, never resume a different run or a damaged checkpoint, never exit 0 with a
number that was not computed, and always end in one or two lines with exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedft.cli import build_parser, main
from fedft.metrics import rundir

from helpers import TINY_CLI

TINY = [*TINY_CLI, "--set", "federation.rounds=2"]


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every file under root (but `skip`) with its size and modification time."""
    out = {}
    for path in root.rglob("*"):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.name == rundir.LOCK:  # a refused process may take the lock to look: not a change
            continue
        if path.is_file():
            stat = path.stat()
            out[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return out


def fedft(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def run(capsys, out: Path, *args: str) -> tuple[int, str, str]:
    return fedft(capsys, "run", *TINY, "--set", f"output_dir={out}", *args)


def assert_refused(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert 1 <= len(lines) <= 2, err
    assert "Traceback" not in err and lines[0].startswith("fedft: error:"), err
    assert needle in err, err


@pytest.fixture
def land(tmp_path: Path) -> tuple[Path, Path]:
    """An output folder with a user's files beside it, above it and inside it, and a finished run."""
    out = tmp_path / "work" / "runs"
    out.mkdir(parents=True)
    (tmp_path / "above.txt").write_text("above")
    (tmp_path / "work" / "beside.txt").write_text("beside")
    (tmp_path / "work" / "notes").mkdir()
    (tmp_path / "work" / "notes" / "n.txt").write_text("notes")
    (out / "inside.txt").write_text("inside")
    mine = out / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("text,label\n")
    return tmp_path, out


# --- 1. a run folder is a run folder ------------------------------------------------------------
NAMES = [".", "..", "", " ", "../notes", "a/b", "/tmp/x", "x/..", "..\\x"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("how", ["--name", "--set"])
def test_no_name_reaches_outside_the_output_folder(capsys, land, name, overwrite, how):
    root, out = land
    before = snapshot(root)
    extra = ["--overwrite"] if overwrite else []
    given = ["--name", name] if how == "--name" else ["--set", f"name={json.dumps(name)}"]
    code, _, err = run(capsys, out, *given, *extra)
    assert_refused(code, err, "is not a folder name")
    assert snapshot(root) == before


def test_overwrite_deletes_only_a_folder_fedft_made_holding_only_its_files(capsys, land):
    root, out = land
    before = snapshot(root)
    code, _, err = run(capsys, out, "--name", "mine", "--overwrite")  # the user's own folder
    assert_refused(code, err, "was not made by fedft")
    assert snapshot(root) == before

    assert run(capsys, out, "--name", "r")[0] == 0
    (out / "r" / "my-notes.txt").write_text("keep me")  # the user put a file into a run folder
    before = snapshot(root)
    code, _, err = run(capsys, out, "--name", "r", "--overwrite")
    assert_refused(code, err, "holds files fedft did not write (my-notes.txt)")
    assert snapshot(root) == before

    (out / "r" / "my-notes.txt").unlink()
    before = snapshot(root, skip=out / "r")
    marker = (out / "r" / rundir.MARKER).read_text()
    assert run(capsys, out, "--name", "r", "--overwrite")[0] == 0
    assert (out / "r" / rundir.MARKER).read_text() != marker  # a new run, with a new run id
    assert snapshot(root, skip=out / "r") == before


def test_output_dir_that_is_a_file_or_cannot_be_made_is_refused(capsys, tmp_path: Path):
    file = tmp_path / "runs.txt"
    file.write_text("a file")
    assert_refused(*run(capsys, file)[::2], "is a file, not a folder")
    assert_refused(*run(capsys, file / "sub")[::2], "cannot be created")
    assert file.read_text() == "a file"


# --- 2. one writer per run folder --------------------------------------------------------------
def test_a_folder_in_use_is_refused_to_a_second_process(capsys, tmp_path: Path):
    out = tmp_path / "runs"
    slow = [*TINY, "--set", "federation.rounds=400", "--set", f"output_dir={out}", "--name", "busy"]
    cmd = [sys.executable, "-m", "fedft.cli", "run", *slow]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not rundir.read_metrics(out / "busy"):  # it has a checkpoint: resumable
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.5)
        overwrite = [*TINY, "--set", f"output_dir={out}", "--name", "busy", "--overwrite"]
        for args in (["--resume", str(out / "busy")], overwrite):
            code, _, err = fedft(capsys, "run", *args)
            assert_refused(code, err, f"is in use by process {first.pid}")
        # a second process, not this test's: the same answer
        second = subprocess.run(
            [sys.executable, "-m", "fedft.cli", "run", "--resume", str(out / "busy")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert_refused(second.returncode, second.stderr, f"in use by process {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the lock died with its process: the folder can be resumed now (two more rounds)
    done = len(rundir.read_metrics(out / "busy"))
    code, _, err = fedft(
        capsys, "run", "--resume", str(out / "busy"), "--set", f"federation.rounds={done + 1}"
    )
    assert code == 0, err
    assert [m["round"] for m in rundir.read_metrics(out / "busy")] == list(range(1, done + 2))


# --- 3. resume continues the same run or refuses ---------------------------------------------
@pytest.fixture
def finished(capsys, tmp_path: Path) -> Path:
    out = tmp_path / "runs"
    code, _, err = run(capsys, out, "--name", "done")
    assert code == 0, err
    return out / "done"


def resume(capsys, run_dir: Path, *args: str) -> tuple[int, str, str]:
    return fedft(capsys, "run", "--resume", str(run_dir), "--quiet", *args)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (("seed: 0", "seed: 3"), "the config changed (seed 0 -> 3"),
        (
            ("max_train_samples: 120", "max_train_samples: 100"),
            "the config changed (data.max_train_samples 120 -> 100",
        ),
        (("lr: null", "lr: 0.5"), "the config changed (train.lr None -> 0.5)"),
    ],
)
def test_an_edited_config_is_not_resumed(capsys, finished: Path, edit, needle):
    config = finished / rundir.CONFIG
    config.write_text(config.read_text().replace(*edit))
    before = snapshot(finished)
    code, _, err = resume(capsys, finished, "--set", "federation.rounds=3")
    assert_refused(code, err, needle)
    assert snapshot(finished) == before


@pytest.mark.parametrize(
    "flags",
    [
        ["--model", "tiny-bert"],
        ["--data", "demo"],
        ["--method", "bias"],
        ["--name", "x"],
        ["--overwrite"],
        ["--config", "run.yaml"],
    ],
)
def test_options_that_cannot_apply_on_resume_are_refused(capsys, finished: Path, flags):
    assert_refused(*resume(capsys, finished, *flags)[::2], f"drop {flags[0]}")


def test_fewer_rounds_than_completed_are_refused_and_change_nothing(capsys, finished: Path):
    before = snapshot(finished)
    code, _, err = resume(capsys, finished, "--set", "federation.rounds=1")
    assert_refused(code, err, "fewer than the 2 rounds already completed")
    assert snapshot(finished) == before


def edit_meta(path: Path) -> None:
    """A valid edit of the meta (the round it claims) that leaves the file well-formed."""
    data = path.read_bytes()
    assert b'\\"round\\": 2' in data
    path.write_bytes(data.replace(b'\\"round\\": 2', b'\\"round\\": 1'))


def zero_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "is damaged"),
        (lambda p: p.write_bytes(b""), "is damaged"),
        (zero_bytes, "fail their checksum"),
        (edit_meta, "fail their checksum"),
    ],
    ids=["truncated", "empty", "zeroed", "meta-edited"],
)
def test_a_damaged_checkpoint_is_refused(capsys, finished: Path, damage, needle):
    damage(finished / rundir.CHECKPOINT)
    before = snapshot(finished)
    assert_refused(*resume(capsys, finished, "--set", "federation.rounds=3")[::2], needle)
    assert snapshot(finished) == before


def test_a_checkpoint_of_another_run_is_refused(capsys, tmp_path: Path, finished: Path):
    code, _, err = run(capsys, tmp_path / "runs", "--name", "other", "--method", "bias")
    assert code == 0, err
    (finished / rundir.CHECKPOINT).write_bytes(
        (tmp_path / "runs/other" / rundir.CHECKPOINT).read_bytes()
    )
    code, _, err = resume(capsys, finished, "--set", "federation.rounds=3")
    assert_refused(code, err, "the config changed (method.name 'bias' -> 'lora'")


# --- 5. torn writes recover --------------------------------------------------------------------
def test_a_torn_metrics_line_and_stale_temporaries_are_cleaned_on_resume(capsys, finished: Path):
    whole = rundir.read_metrics(finished)
    with (finished / rundir.METRICS).open("a") as fh:
        fh.write('{"round": 3, "clients": [0')  # a kill in the middle of the next line
    (finished / f".{rundir.CHECKPOINT}.tmp").write_bytes(b"half a checkpoint")
    (finished / f".{rundir.SUMMARY}.tmp").write_text("{")
    code, _, err = resume(capsys, finished, "--set", "federation.rounds=3")
    assert code == 0, err
    lines = rundir.read_metrics(finished)
    assert [m["round"] for m in lines] == [1, 2, 3]
    assert lines[:2] == whole
    assert not list(finished.glob(".*.tmp"))


def test_a_run_killed_before_its_first_checkpoint_is_replaced_without_overwrite(
    capsys, tmp_path: Path
):
    out = tmp_path / "runs"
    out.mkdir()
    lock = rundir.start_run_dir(out / "early", "{}", overwrite=False)
    lock.release()  # the process that made it died before round 1 was checkpointed
    code, _, err = run(capsys, out, "--name", "early")
    assert code == 0, err
    assert rundir.read_metrics(out / "early")
    # once it holds results, the same name is refused again
    assert_refused(*run(capsys, out, "--name", "early")[::2], "exists; pass --overwrite")


# --- 6. non-finite means stop ------------------------------------------------------------------
@pytest.mark.parametrize(
    "setting",
    [
        "train.lr=.inf",
        "train.lr=.nan",
        "privacy.epsilon=.inf",
        "federation.server_lr=-.inf",
        "data.alpha=.nan",
        "method.alpha=.inf",
    ],
)
def test_non_finite_options_are_refused_at_the_door(capsys, tmp_path: Path, setting):
    sets = ["--set", setting]
    if setting.startswith("privacy"):
        sets += ["--set", "privacy.mode=sample"]
    code, _, err = run(capsys, tmp_path / "runs", *sets)
    assert_refused(code, err, setting.split("=")[0])
    assert "finite" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_overflowing_aggregate_stops_the_run_before_it_is_checkpointed(capsys, tmp_path: Path):
    out = tmp_path / "runs"
    code, _, err = run(
        capsys, out, "--name", "bad", "--set", "federation.server_lr=1e300", "--set", "train.lr=0.1"
    )
    assert_refused(code, err, "round 1: the new global state holds non-finite values")
    assert not (out / "bad" / rundir.CHECKPOINT).exists()
    assert rundir.read_metrics(out / "bad") == []
    # it holds no results, so the same name runs again without --overwrite
    assert run(capsys, out, "--name", "bad")[0] == 0


def test_a_diverging_client_is_that_clients_failure(capsys, tmp_path: Path):
    """At lr 1e30 every client's loss turns non-finite at its second step: each fails (recorded,
    left out), and a round with no answer stops the run with the reason."""
    out = tmp_path / "runs"
    sets = ["train.lr=1e30", "train.max_grad_norm=null", "train.max_steps=3"]
    code, _, err = run(capsys, out, "--name", "diverge", *[a for s in sets for a in ("--set", s)])
    assert code == 2 and "round 1: only 0 of 2 clients answered" in err, err
    assert "Traceback" not in err and rundir.read_metrics(out / "diverge") == []


def test_a_non_finite_update_is_left_out_of_the_aggregate(tmp_path: Path):
    from fedft.federation.payload import ClientCost, Payload, Reply
    from fedft.federation.server import FedAvgServer

    from helpers import tiny_config

    server = FedAvgServer(tiny_config(tmp_path), {"w": torch.zeros(3)})
    good = Reply(0, "train", Payload({"w": torch.ones(3)}, {"num_examples": 4}), None, ClientCost())
    bad = Reply(
        1, "train", Payload({"w": torch.tensor([1.0, float("nan"), 0.0])}), None, ClientCost()
    )
    lossy = Reply(
        2, "train", Payload({"w": torch.ones(3)}, {"train_loss": float("inf")}), None, ClientCost()
    )
    assert server.require_replies([good, bad, lossy], 1) == [good]
    assert "non-finite values in w" in bad.error and "train_loss" in lossy.error


# --- 8. silent caps speak ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (
            ["federation.min_replies=3"],
            "federation.min_replies=3 is more than the 2 clients sampled",
        ),
        (
            ["federation.sample_count=4"],
            "federation.sample_count=4 is more than federation.clients=3",
        ),
    ],
)
def test_caps_that_would_apply_silently_are_refused(capsys, tmp_path: Path, sets, needle):
    args = [a for s in sets for a in ("--set", s)]
    assert_refused(*run(capsys, tmp_path / "runs", *args)[::2], needle)


# --- 9. every CLI path --------------------------------------------------------------------------
def test_report_on_what_is_not_a_finished_run(capsys, tmp_path: Path, finished: Path):
    assert_refused(*fedft(capsys, "report", str(tmp_path / "nothing"))[::2], "is not a folder")
    assert_refused(*fedft(capsys, "report", str(tmp_path))[::2], "is not a fedft run folder")
    (finished / rundir.SUMMARY).write_text('{"name": "done"')
    assert_refused(*fedft(capsys, "report", str(finished))[::2], "summary.json is damaged")
    (finished / rundir.SUMMARY).write_text('{"name": "done"}')
    assert_refused(*fedft(capsys, "report", str(finished))[::2], "summary.json is damaged")


def test_help_describes_set_and_every_argument_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "YAML" in text and "fedft config" in text
    assert text.count("  fedft run ") >= 2  # examples
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"fedft {name}: {action.dest} has no help"


def test_the_cli_module_runs_as_a_program(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "fedft.cli", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert_refused(done.returncode, done.stderr, "is not a fedft run folder")
