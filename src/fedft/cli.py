"""`fedft` command line: run, methods, config, report, export, generate.

Bad input (a `FedftError`) prints one line and exits with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fedft.errors import FedftError

EXIT_BAD_INPUT = 2


class TqdmProgress:
    """A bar over client updates, with the round and last accuracy beside it."""

    def __init__(self) -> None:
        self.bar = None

    def start(self, total_rounds: int, first_round: int, clients_per_round: int) -> None:
        from tqdm import tqdm

        total = (total_rounds - first_round + 1) * clients_per_round
        self.bar = tqdm(
            total=total,
            unit="update",
            desc=f"round {first_round}/{total_rounds}",
            dynamic_ncols=True,
        )
        self.total_rounds = total_rounds

    def client_done(self, reply) -> None:
        if self.bar is not None and reply.kind == "train":
            self.bar.update(1)

    def round_done(self, line: dict[str, Any]) -> None:
        if self.bar is None:
            return
        post = {"MB": f"{line['total_mb']:.1f}"}
        if line.get("test_accuracy") is not None:
            post["acc"] = f"{100 * line['test_accuracy']:.1f}%"
        elif line.get("test_rouge_l") is not None:
            post["rougeL"] = f"{100 * line['test_rouge_l']:.1f}"
        elif line.get("test_perplexity") is not None:
            post["ppl"] = f"{line['test_perplexity']:.2f}"
        if line["failed"]:
            post["failed"] = len(line["failed"])
        self.bar.set_postfix(post)
        self.bar.set_description(
            f"round {min(line['round'] + 1, self.total_rounds)}/{self.total_rounds}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(args: argparse.Namespace) -> int:
    from fedft.config import build_config, validate_config
    from fedft.federation.engine import (
        LOCAL_SECURE_AGGREGATION,
        build_task,
        make_server,
        run_federation,
    )
    from fedft.metrics import rundir
    from fedft.metrics.report import format_summary

    shortcuts = {}
    if args.data is not None:
        shortcuts["data.source"] = args.data
    if args.model is not None:
        shortcuts["model.name"] = args.model
    if args.method is not None:
        shortcuts["method.name"] = args.method
    if args.name is not None:
        shortcuts["name"] = args.name

    lock = None
    if args.resume:
        fixed = [
            flag
            for flag, value in (
                ("--config", args.config),
                ("--data", args.data),
                ("--model", args.model),
                ("--method", args.method),
                ("--name", args.name),
                ("--overwrite", args.overwrite or None),
            )
            if value is not None
        ]
        if fixed:
            raise FedftError(
                f"--resume continues the run as it was configured: drop {', '.join(fixed)} "
                "(only --set federation.rounds=N may change)"
            )
        run_dir = Path(args.resume)
        saved = run_dir / rundir.CONFIG
        if not saved.is_file():
            raise FedftError(
                f"--resume {run_dir}: no {rundir.CONFIG} there; give the folder of an earlier run"
            )
        lock = rundir.RunLock(run_dir).acquire()  # one writer: refuses a folder in use
        cfg = build_config(saved, args.set)
        before = validate_config(_read_yaml(saved)).model_dump(mode="json")
        after = cfg.model_dump(mode="json")
        before["federation"].pop("rounds")
        after["federation"].pop("rounds")
        if before != after:
            raise FedftError(
                "--resume: only federation.rounds may change on resume; start a new run for other changes"
            )
        _, meta = rundir.load_checkpoint(run_dir)  # fails clearly before anything is touched
        if cfg.federation.rounds < int(meta["round"]):
            raise FedftError(
                f"--resume {run_dir}: federation.rounds={cfg.federation.rounds} is fewer than the "
                f"{meta['round']} rounds already completed; give at least {meta['round']}"
            )
        task = build_task(cfg)
        server = make_server(task)
    else:
        cfg = build_config(args.config, args.set, base=shortcuts)
        if cfg.federation.secure_aggregation:
            raise FedftError(LOCAL_SECURE_AGGREGATION)
        task = build_task(cfg)  # every input check happens here, before any file is written
        cfg = task.cfg  # as the data resolved it (a column partition's client count)
        server = make_server(task)  # and the server's own (a model or data only it loads)
        run_dir, lock = rundir.new_run_dir(cfg, args.overwrite)

    classes = f", {task.data.num_labels} classes" if task.data.num_labels else ""
    print(
        f"fedft: {cfg.method.name} on {cfg.model.name} ({task.model.task.describe()}), data "
        f"{cfg.data.source} ({len(task.data.train)} train / {len(task.data.test)} test rows"
        f"{classes}), {cfg.federation.clients} clients ({task.data.partition}), "
        f"{cfg.federation.rounds} rounds, device {task.device}; "
        f"{task.trainable_params:,} trainable parameters -> {run_dir}",
        flush=True,
    )
    try:
        summary = run_federation(
            task,
            run_dir,
            resume=bool(args.resume),
            progress=None if args.quiet else TqdmProgress(),
            server=server,
        )
    finally:
        lock.release()
    print(format_summary(summary))
    if summary.get("headline") == "accuracy" and task.data.num_labels:
        print(f"chance level: {100 / task.data.num_labels:.1f}%   run folder: {run_dir}")
    else:
        print(f"run folder: {run_dir}")
    return 0


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FedftError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise FedftError(f"{path} must hold a mapping of sections")
    return tree


def _methods(_: argparse.Namespace) -> int:
    from fedft.methods import available_methods, get_method

    names = available_methods()
    width = max(len(n) for n in names)
    for name in names:
        method = get_method(name)
        dp = ", ".join(method.privacy_modes) or "none"
        print(f"{name.ljust(width)}  {method.summary} [privacy: {dp}]")
    return 0


def _config(_: argparse.Namespace) -> int:
    from fedft.config import describe_fields

    print(describe_fields())
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedft.metrics import rundir
    from fedft.metrics.report import format_summary

    folder = Path(args.run_dir)
    if not folder.is_dir():
        raise FedftError(f"{folder} is not a folder; give a run folder, e.g. runs/lora-demo")
    path = folder / rundir.SUMMARY
    if not path.is_file():
        if not (folder / rundir.CONFIG).is_file():
            raise FedftError(f"{folder} is not a fedft run folder (no {rundir.CONFIG} in it)")
        raise FedftError(
            f"{folder} has no {rundir.SUMMARY}; the run has not finished (resume it with fedft run --resume)"
        )
    try:
        summary = json.loads(path.read_text())
        table = format_summary(summary)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise FedftError(
            f"{path} is damaged ({type(exc).__name__}: {str(exc)[:80]}); rerun or resume the run "
            "to write it again"
        ) from None
    print(table)
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedft.export import export_run

    out = Path(args.out)
    kind = export_run(Path(args.run_dir), out, with_base=args.with_base)
    print(
        f"fedft: exported {args.run_dir} as {kind} to {out} (how to load it: {out / 'README.md'})"
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fedft.export import generate_answers

    for answer in generate_answers(Path(args.run_dir), args.prompt, args.max_new_tokens):
        print(answer)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedft", description="Federated fine-tuning of pretrained models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a federated fine-tuning job",
        description=(
            "Run (or resume) a federated fine-tuning job. The config is the YAML file, then the "
            "shortcuts, then each --set in order; `fedft config` lists every field with its "
            "default and help."
        ),
        epilog=(
            "examples:\n"
            "  fedft run --data ../shared/data/sst2 --set method.name=adapter --set method.r=32\n"
            "  fedft run --config run.yaml --set federation.clients=50 --set 'method.target_modules=[query, value]'\n"
            "  fedft run --resume runs/lora-demo --set federation.rounds=12"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", help="YAML config file with sections model, data, federation, ...")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field by its dotted name; the value is YAML (8, 1e-3, true, [a, b], "
        "null), e.g. --set method.name=bias; repeat for more",
    )
    run.add_argument("--data", help="shortcut for --set data.source=...")
    run.add_argument("--model", help="shortcut for --set model.name=...")
    run.add_argument("--method", help="shortcut for --set method.name=...")
    run.add_argument("--name", help="run folder name under output_dir")
    run.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run folder of the same name (only one that fedft made, holding only its files)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    sub.add_parser("methods", help="list the registered methods").set_defaults(func=_methods)
    sub.add_parser(
        "config", help="print every config field with its default and help"
    ).set_defaults(func=_config)
    report = sub.add_parser("report", help="print the summary table of a finished run")
    report.add_argument("run_dir", help="a run folder, e.g. runs/lora-demo")
    report.set_defaults(func=_report)
    export = sub.add_parser(
        "export",
        help="write a run's tuned model as a folder plain Hugging Face code loads",
        description="Write the tuned model of a run: a peft adapter (LoRA, causal-LM prompts), "
        "the merged model (full, head, bias), or the model with a modeling file for modules no "
        "library has (adapter). OUT/README.md says how to load it.",
    )
    export.add_argument("run_dir", help="a run folder, e.g. runs/lora-demo")
    export.add_argument("out", help="a new folder to write")
    export.add_argument(
        "--with-base",
        action="store_true",
        help="also write the base model into OUT/base (default: only when no name loads it)",
    )
    export.set_defaults(func=_export)
    generate = sub.add_parser(
        "generate", help="print a generative run's answer to a prompt (greedy)"
    )
    generate.add_argument("run_dir", help="a run folder of a causal LM run")
    generate.add_argument("prompt", nargs="+", help="one or more prompts (the user's content)")
    generate.add_argument("--max-new-tokens", type=int, default=None, help="tokens per answer")
    generate.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="fedft: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FedftError as exc:
        print(f"fedft: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # the reader went away (`fedft report RUN | head`): not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
        return 0
    except KeyboardInterrupt:
        print(
            "fedft: interrupted; the last checkpoint is intact (continue with fedft run --resume RUN_DIR)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
