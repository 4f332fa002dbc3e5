"""Bad input at the CLI: one clear line, exit code 2, no traceback, nothing written over."""

import subprocess
import sys
from pathlib import Path

import pytest

from fedft.cli import main

from helpers import TINY_CLI

TINY = TINY_CLI


def run_cli(capsys, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    code = main(["run", *TINY, "--set", f"output_dir={tmp_path / 'runs'}", *args])
    out, err = capsys.readouterr()
    return code, out, err


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--method", "sparkle"], "unknown method 'sparkle'; choose one of:"),
        (["--model", "./models/missing"], "model folder ./models/missing does not exist"),
        (["--data", "./data/missing"], "data path ./data/missing does not exist"),
        (
            ["--set", "federation.clients=500"],
            "federation.clients=500 is more than the 120 training rows",
        ),
        (["--method", "prompt", "--set", "method.deep=true"], "deep prompts are for ViT"),
        (["--model", "tiny-vit"], "model 'tiny-vit' takes image input but the data demo is text"),
        (["--set", "train.batch_size=-1"], "train.batch_size"),
        (
            ["--method", "zo", "--set", "privacy.mode=sample", "--set", "privacy.epsilon=0.0001"],
            "privacy.epsilon=0.0001 cannot be met",
        ),
        (["--method", "zo", "--set", "privacy.mode=sample"], "needs privacy.epsilon"),
        (
            ["--set", "privacy.mode=client", "--set", "privacy.epsilon=0.05"],
            "client-level DP with 3 clients: privacy.epsilon=0.05 cannot be met",
        ),
        (
            ["--method", "zo", "--set", "privacy.mode=client", "--set", "privacy.epsilon=8"],
            "privacy.mode=client: method 'zo' does not offer it",
        ),
        (  # refused by the server it would build: the run folder is not created either
            [
                "--method",
                "fedpt",
                "--set",
                "method.large_head=own",
                "--set",
                "method.small_layers=1",
            ],
            "the large model answers over 2 labels",
        ),
        (
            [
                "--method",
                "fedpft",
                "--set",
                "method.keep_layers=[0]",
                "--set",
                "method.public_data=./public/missing.csv",
            ],
            "method.public_data: ./public/missing.csv does not exist",
        ),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(capsys, tmp_path: Path, args, needle):
    code, _, err = run_cli(capsys, tmp_path, *args)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_missing_column_and_label_out_of_range(capsys, tmp_path: Path):
    data = write_csv(tmp_path / "d1", "sentence,label", [f"s{i},{i % 2}" for i in range(40)])
    code, _, err = run_cli(capsys, tmp_path, "--data", str(data))
    assert code == 2 and "no text column 'text'" in err and "set data.text_column" in err
    data = write_csv(
        tmp_path / "d2", "text,label", [f"s{i},{i % 2}" for i in range(40)] + ["bad,9"]
    )
    (data / "labels.txt").write_text("a\nb\n")
    code, _, err = run_cli(capsys, tmp_path, "--data", str(data))
    assert code == 2 and "has label 9, outside 0..1" in err


def test_existing_run_is_not_overwritten_without_flag(capsys, tmp_path: Path):
    assert run_cli(capsys, tmp_path, "--name", "keep")[0] == 0
    summary = (tmp_path / "runs" / "keep" / "summary.json").read_text()
    code, _, err = run_cli(capsys, tmp_path, "--name", "keep", "--method", "bias")
    assert code == 2 and "exists; pass --overwrite" in err
    assert (tmp_path / "runs" / "keep" / "summary.json").read_text() == summary
    assert run_cli(capsys, tmp_path, "--name", "keep", "--method", "bias", "--overwrite")[0] == 0
    assert '"method": "bias"' in (tmp_path / "runs" / "keep" / "summary.json").read_text()
    # a default name never overwrites: it gets a number
    assert run_cli(capsys, tmp_path)[0] == 0 and run_cli(capsys, tmp_path)[0] == 0
    assert (tmp_path / "runs" / "lora-demo").is_dir() and (
        tmp_path / "runs" / "lora-demo-2"
    ).is_dir()


def test_resume_from_the_cli_continues_and_refuses_other_changes(capsys, tmp_path: Path):
    assert run_cli(capsys, tmp_path, "--name", "r")[0] == 0
    run_dir = tmp_path / "runs" / "r"
    assert main(["run", "--resume", str(run_dir), "--set", "federation.rounds=2", "--quiet"]) == 0
    assert '"rounds_completed": 2' in (run_dir / "summary.json").read_text()
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir), "--set", "method.r=4"]) == 2
    assert "only federation.rounds may change" in capsys.readouterr().err


def test_real_process_exit_code_and_methods_listing(tmp_path: Path):
    bad = subprocess.run(
        [sys.executable, "-m", "fedft", "run", "--method", "nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and bad.stderr.startswith(
        "fedft: error: method.name: unknown method 'nope'"
    )
    assert "Traceback" not in bad.stderr
    listing = subprocess.run(
        [sys.executable, "-m", "fedft", "methods"], capture_output=True, text=True
    )
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert {"full", "head", "bias", "adapter", "prompt", "lora"} <= set(names)
    modes = {
        line.split()[0]: line.rsplit("[privacy: ", 1)[1] for line in listing.stdout.splitlines()
    }
    assert modes["lora"] == "sample, client]" and modes["zo"] == "sample]"
