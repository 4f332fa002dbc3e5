"""The local engine: build a task from a config, run its rounds, measure and record each one.

Everything that can be wrong with the input is found in `build_task`, before any file is written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fedft.config import RunConfig
from fedft.data import FederatedData, build_federated_data, check_fits, load_raw
from fedft.errors import BudgetSpent, ConfigError, ModelError, RunStopped
from fedft.federation.client import CLIENT, ClientRuntime
from fedft.federation.fingerprint import check_fingerprint, run_fingerprint
from fedft.federation.grid import Grid, LocalGrid
from fedft.federation.payload import Message, Reply
from fedft.federation.sampling import clients_per_round
from fedft.federation.server import Server
from fedft.federation.training import evaluate, read_state, supports_checkpointing
from fedft.methods import Method, get_method
from fedft.metrics import rundir
from fedft.metrics.plots import plot_metric
from fedft.models.backbone import TaskModel, load_task_model, resolve_device, resolve_task_kind
from fedft.models.zero_shot import ZERO_SHOT_SCALE, ZERO_SHOT_TEMPLATE, make_zero_shot
from fedft.privacy import check_budgets
from fedft.privacy.client_level import WITHHELD, privacy_view, round_participants
from fedft.privacy.noise import NOT_PRIVATE
from fedft.tasks import make_generate

MB = 1_000_000
EVAL_CLIENTS_TAG = 0xE7  # the seed stream that picks the clients of the final evaluation
log = logging.getLogger("fedft")


@dataclass
class Task:
    cfg: RunConfig
    data: FederatedData
    model: TaskModel
    method: Method
    device: torch.device

    @property
    def trainable_params(self) -> int:
        params = dict(self.model.named_parameters())
        return sum(params[n].numel() for n in self.method.trainable_names)

    @property
    def trainable_bytes(self) -> int:
        params = dict(self.model.named_parameters())
        return sum(
            params[n].numel() * params[n].element_size() for n in self.method.trainable_names
        )


def build_task(cfg: RunConfig) -> Task:
    generate = resolve_task_kind(cfg.model.name, cfg.task.kind) == "generate"
    raw = load_raw(cfg.data, cfg.seed, cfg.task if generate else None)
    model = load_task_model(
        cfg.model.name, raw.num_labels, cfg.model.max_length, cfg.seed, causal=generate
    )
    model.label_names = list(raw.label_names)
    check_fits(raw, model.preprocess.kind, cfg.model.name)
    method = get_method(cfg.method.name)(cfg.method_options())
    if cfg.model.head == "auto":  # resolved into the run's config, as it ran
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"head": "task"})})
        text_encoder = model.kind == "text" and not generate
        if method.zero_shot_head_under_dp and cfg.privacy.mode == "sample" and text_encoder:
            head = cfg.model.model_copy(update={"head": "zero_shot"})
            cfg = cfg.model_copy(update={"model": head})
    if cfg.model.head == "zero_shot":
        if generate:
            raise ModelError(
                "model.head=zero_shot is for a text encoder's classifier; a causal LM on "
                "classification rows scores its label words already (leave model.head=task)"
            )
        make_zero_shot(model, ZERO_SHOT_TEMPLATE, ZERO_SHOT_SCALE)
    if generate:
        model.task = make_generate(cfg, raw, model.preprocess.tokenizer)
    server_rows = cfg.data.server_rows
    if server_rows is None:
        server_rows = method.server_rows_wanted()
    data = build_federated_data(cfg, raw, model.task.encode_splits, server_rows)
    if len(data.clients) != cfg.federation.clients:  # a column partition's one client a value
        federation = cfg.federation.model_copy(update={"clients": len(data.clients)})
        cfg = cfg.model_copy(update={"federation": federation})
    method.validation = data.validation
    method.check_run(cfg)
    check_privacy(cfg, method, data)
    method.prepare(model)
    if cfg.train.gradient_checkpointing and not supports_checkpointing(model.net):
        raise ConfigError(
            f"train.gradient_checkpointing: {type(model.net).__name__} (method "
            f"'{method.name}') cannot recompute its blocks; turn it off"
        )
    device = resolve_device(cfg.device)
    model.to(device)
    return Task(cfg, data, model, method, device)


def check_privacy(cfg: RunConfig, method: Method, data: FederatedData) -> None:
    """Refuse, before anything trains, DP the method lacks or a budget some client cannot meet."""
    mode = cfg.privacy.mode
    if mode == "none":
        return
    if cfg.federation.count_flops:
        raise ConfigError(
            f"federation.count_flops under privacy.mode={mode}: a client's FLOPs count the rows "
            "it trained on, which DP keeps secret (Poisson batches, who took part); count them "
            "in a run without DP"
        )
    if mode not in method.privacy_modes:
        from fedft.methods import available_methods, get_method

        having = [m for m in available_methods() if mode in get_method(m).privacy_modes]
        raise ConfigError(
            f"privacy.mode={mode}: method '{method.name}' does not offer it; methods that do: "
            f"{', '.join(having) or 'none'}"
        )
    check_budgets(cfg, [len(split.train) for split in data.clients])


class Progress(Protocol):
    def start(self, total_rounds: int, first_round: int, clients_per_round: int) -> None: ...
    def client_done(self, reply: Reply) -> None: ...
    def round_done(self, line: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


@dataclass
class Totals:
    bytes: int = 0
    elapsed_seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_cuda_bytes: int = 0
    failures: int = 0
    stopped: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_history(cls, history: list[dict[str, Any]]) -> Totals:
        totals = cls(history=list(history))
        if history:
            last = history[-1]
            totals.bytes = last["total_bytes"]
            totals.elapsed_seconds = last["elapsed_seconds"]
            totals.peak_rss_bytes = int(max(m["client_peak_rss_mb"] for m in history) * MB)
            totals.peak_cuda_bytes = int(max(m["client_peak_cuda_mb"] for m in history) * MB)
            totals.failures = sum(len(m["failed"]) for m in history)
        return totals


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def merge_by_client(replies: list[Reply]) -> list[Reply]:
    """One reply per client for reporting: a method with several exchanges in a round (split
    learning) sums its bytes and seconds, takes the peak memory, and keeps the last payload and
    the first error."""
    merged: dict[int, Reply] = {}
    for r in replies:
        if r.client not in merged:
            merged[r.client] = Reply(r.client, r.kind, r.payload, r.error, replace(r.cost))
            continue
        m = merged[r.client]
        c = m.cost
        c.bytes_down += r.cost.bytes_down
        c.bytes_up += r.cost.bytes_up
        c.scalar_bytes_down += r.cost.scalar_bytes_down
        c.scalar_bytes_up += r.cost.scalar_bytes_up
        c.seconds += r.cost.seconds
        c.peak_rss_bytes = max(c.peak_rss_bytes, r.cost.peak_rss_bytes)
        c.peak_cuda_bytes = max(c.peak_cuda_bytes, r.cost.peak_cuda_bytes)
        c.flops += r.cost.flops
        m.payload = r.payload if r.payload is not None else m.payload
        m.error = m.error or r.error
    return list(merged.values())


def round_line(
    round_number: int,
    replies: list[Reply],
    outcome_metrics: dict[str, Any],
    totals: Totals,
    trainable_params: int,
    headline: str = "accuracy",
) -> dict[str, Any]:
    exchanges = len(replies)
    replies = merge_by_client(replies)
    ok = [r for r in replies if r.ok]
    round_bytes = sum(
        r.cost.bytes_down + r.cost.bytes_up + r.cost.scalar_bytes_down + r.cost.scalar_bytes_up
        for r in replies
    )
    totals.bytes += round_bytes
    peak_rss = max((r.cost.peak_rss_bytes for r in replies), default=0)
    peak_cuda = max((r.cost.peak_cuda_bytes for r in replies), default=0)
    totals.peak_rss_bytes = max(totals.peak_rss_bytes, peak_rss)
    totals.peak_cuda_bytes = max(totals.peak_cuda_bytes, peak_cuda)
    failed = [{"client": r.client, "error": r.error} for r in replies if not r.ok]
    totals.failures += len(failed)
    counted = any(r.cost.flops for r in replies)  # federation.count_flops
    flops = {"client_flops_mean": _mean([r.cost.flops for r in ok])} if counted else {}
    return {
        "round": round_number,
        "clients": [r.client for r in replies],
        "failed": failed,
        "exchanges": exchanges,
        **outcome_metrics,
        "test_loss": None,
        f"test_{headline}": None,
        "bytes_down": sum(r.cost.bytes_down for r in replies),
        "bytes_up": sum(r.cost.bytes_up for r in replies),
        "bytes_down_per_client": _mean([r.cost.bytes_down for r in ok]),
        "bytes_up_per_client": _mean([r.cost.bytes_up for r in ok]),
        "scalar_bytes": sum(r.cost.scalar_bytes_down + r.cost.scalar_bytes_up for r in replies),
        "round_bytes": round_bytes,
        "total_bytes": totals.bytes,
        "total_mb": totals.bytes / MB,
        "trainable_params": trainable_params,
        "client_seconds_mean": _mean([r.cost.seconds for r in replies]),
        "client_seconds_max": max((r.cost.seconds for r in replies), default=0.0),
        "client_peak_rss_mb": peak_rss / MB,
        "client_peak_cuda_mb": peak_cuda / MB,
        **flops,
        "per_client": [
            {
                "client": r.client,
                "bytes_down": r.cost.bytes_down,
                "bytes_up": r.cost.bytes_up,
                "seconds": round(r.cost.seconds, 4),
                "peak_rss_mb": round(r.cost.peak_rss_bytes / MB, 1),
                **({"flops": r.cost.flops} if counted else {}),
                "num_examples": (r.payload.scalars.get("num_examples") if r.payload else None),
                "error": r.error,
            }
            for r in replies
        ],
    }


def evaluate_global(task: Task, server: Server) -> dict[str, float]:
    """Each model the server scores, on the global test split: `<prefix>_<metric>` for every
    metric of the task (classify: loss, accuracy; generate: loss, perplexity, Rouge-L or
    label-word accuracy). A model marked `frozen` (the same every round: a black-box large
    model alone) is scored once and its scores kept on it."""
    out = {}
    for prefix, model in server.evaluation_models(task.model).items():
        metrics = getattr(model, "frozen_scores", None)
        if metrics is None:
            size = task.cfg.train.batch_size * 4
            metrics = evaluate(model, task.data.test, None, size, task.device).metrics
            if getattr(model, "frozen", False):
                model.frozen_scores = metrics
        out.update({f"{prefix}_{key}": value for key, value in metrics.items()})
    return {**out, **server.evaluation_costs()}


def wants_initial_eval(task: Task) -> bool:
    flag = task.cfg.federation.eval_initial
    return task.model.generative if flag is None else flag


def evaluate_initial(task: Task, server: Server) -> dict[str, Any]:
    """The untuned model's scores (the starting state), before any round: what tuning is
    measured against."""
    started = time.perf_counter()
    scores = evaluate_global(task, server)
    return {**scores, "seconds": time.perf_counter() - started}


def evaluation_clients(task: Task) -> tuple[list[int], int]:
    """The clients that score the final model (at most `federation.eval_clients`, drawn once
    with the run seed from those with local test rows: a bounded cost at any population), and
    how many they were drawn from."""
    clients = [c for c in range(task.cfg.federation.clients) if len(task.data.clients[c].test) > 0]
    population = len(clients)
    wanted = task.cfg.federation.eval_clients
    if wanted is not None and wanted < population:
        rng = np.random.default_rng([task.cfg.seed, EVAL_CLIENTS_TAG])
        clients = sorted(rng.choice(clients, size=wanted, replace=False).tolist())
    return clients, population


def evaluate_clients(task: Task, server: Server, grid: Grid, round_number: int) -> dict[str, Any]:
    """Each client scores the final global model on its local test rows (non-IID shows here).

    Under sample-level DP these figures are published as they are: the local test rows never
    train, so DP-SGD does not cover them (and does not need to for the training rows' sake).
    Under client-level DP they would be per-client statistics that no mechanism noised: withheld.
    """
    if "evaluate" not in task.method.client_handlers():
        return {}  # a client that cannot run the whole model alone (split learning)
    p = task.cfg.privacy
    if p.mode == "client" and not p.reproducible_noise_not_private:
        return {"withheld": WITHHELD}
    clients, population = evaluation_clients(task)
    started = time.perf_counter()
    replies = grid.exchange(
        [Message(c, "evaluate", server.evaluation_payload(c), round_number) for c in clients]
    )
    ok = [r for r in replies if r.ok]
    if not ok:
        return {}
    weights = [float(r.payload.scalars["num_examples"]) for r in ok]
    out: dict[str, Any] = {"clients": len(ok), "sampled_from": population}
    metrics = [k for k in ok[0].payload.scalars if k not in ("num_examples", "generated")]
    for key in metrics:
        values = [float(r.payload.scalars[key]) for r in ok]
        out[f"weighted_{key}"] = sum(v * w for v, w in zip(values, weights, strict=True)) / sum(
            weights
        )
        out[f"min_{key}"] = min(values)
        out[f"max_{key}"] = max(values)
    out["bytes"] = sum(
        r.cost.bytes_down + r.cost.bytes_up + r.cost.scalar_bytes_up + r.cost.scalar_bytes_down
        for r in replies
    )
    out["seconds"] = time.perf_counter() - started
    return out


def privacy_summary(task: Task, history: list[dict[str, Any]]) -> dict[str, Any] | None:
    cfg = task.cfg
    if cfg.privacy.mode == "none":
        return None
    spent = next(
        (m["epsilon_per_client"] for m in reversed(history) if "epsilon_per_client" in m), {}
    )
    every = next(  # client-level DP: one mechanism, every client has spent the same
        (m["epsilon_all_clients"] for m in reversed(history) if "epsilon_all_clients" in m), None
    )
    plans = check_budgets(cfg, [len(split.train) for split in task.data.clients])
    sigmas = [plan.noise_multiplier for plan in plans]
    private = not cfg.privacy.reproducible_noise_not_private
    return {
        "mode": cfg.privacy.mode,
        "private": private,
        **({} if private else {"note": NOT_PRIVATE}),
        "target_epsilon": cfg.privacy.epsilon,
        "delta": cfg.privacy.delta,
        "clip": cfg.privacy.clip,
        "noise_multiplier_min": min(sigmas),
        "noise_multiplier_max": max(sigmas),
        "epsilon_max": every if every is not None else max(spent.values(), default=0.0),
        **({"epsilon_all_clients": every} if every is not None else {"epsilon_per_client": spent}),
    }


def make_summary(
    task: Task,
    run_dir: Path,
    totals: Totals,
    client_eval: dict[str, Any],
    initial: dict[str, Any] | None = None,
) -> dict[str, Any]:
    history = totals.history
    objective = task.model.task
    key = f"test_{objective.headline}"
    evals = [m for m in history if m.get("test_loss") is not None]
    scored = [m for m in evals if m.get(key) is not None]
    pick = max if objective.higher_is_better else min
    best = pick(scored, key=lambda m: m[key]) if scored else None
    final = evals[-1] if evals else None
    return {
        "name": run_dir.name,
        "method": task.cfg.method.name,
        "model": task.cfg.model.name,
        "data": task.cfg.data.source,
        "device": str(task.device),
        "clients": task.cfg.federation.clients,
        "task": objective.describe(),
        "headline": objective.headline,
        "rounds_completed": history[-1]["round"] if history else 0,
        "final_accuracy": final.get("test_accuracy") if final else None,
        "final_loss": final["test_loss"] if final else None,
        "best_accuracy": best.get("test_accuracy") if best else None,
        f"best_{objective.headline}": best[key] if best else None,
        "best_round": best["round"] if best else None,
        "lr": task.method.lr(task.cfg),
        "method_choices": task.method.choices(),
        "trainable_params": task.trainable_params,
        "trainable_bytes": task.trainable_bytes,
        "bytes_up_per_client_per_round": _mean([m["bytes_up_per_client"] for m in history]),
        "bytes_down_per_client_per_round": _mean([m["bytes_down_per_client"] for m in history]),
        "total_bytes": totals.bytes,
        "total_mb": totals.bytes / MB,  # the rounds'; run_total_mb adds the final client evaluation
        "run_total_mb": (totals.bytes + client_eval.get("bytes", 0)) / MB,
        "client_peak_rss_mb": totals.peak_rss_bytes / MB,
        "client_peak_cuda_mb": totals.peak_cuda_bytes / MB,
        # federation.count_flops: a client's floating-point operations in a round, mean
        "client_flops_per_round": (
            _mean([m["client_flops_mean"] for m in history])
            if history and all("client_flops_mean" in m for m in history)
            else None
        ),
        "seconds": totals.elapsed_seconds,  # the rounds'; run_seconds adds the client evaluation
        "run_seconds": totals.elapsed_seconds + client_eval.get("seconds", 0.0),
        "seconds_per_round": totals.elapsed_seconds / len(history) if history else 0.0,
        # None under client-level DP, whose lines withhold the participants' timings
        "client_seconds_per_round": (
            _mean([m["client_seconds_mean"] for m in history])
            if all("client_seconds_mean" in m for m in history)
            else None
        ),
        "failed_client_updates": totals.failures,
        "stopped": totals.stopped,
        "privacy": privacy_summary(task, history),
        "client_eval": client_eval,
        "initial": initial,
        # every figure of the last evaluation (`final_perplexity`, `final_rouge_l`, ...), and of
        # the other models the server scores beside the main one (`submodel_final_accuracy`)
        **{
            name.replace("_test_", "_final_") if "_test_" in name else "final_" + name[5:]: value
            for name, value in (final or {}).items()
            if "_test_" in name or name.startswith("test_")
        },
        **({"data_cut": dict(cut)} if (cut := getattr(objective, "cut", None)) else {}),
    }


def make_server(task: Task) -> Server:
    """The method's server, from the task's starting trainable state. It may load models and data
    of its own (a full model, a large model, public inputs) and refuse what does not fit."""
    server = task.method.make_server(task.cfg, read_state(task.model, task.method.trainable_names))
    if task.cfg.federation.secure_aggregation and not server.aggregates_a_sum():
        raise ConfigError(
            f"federation.secure_aggregation: the server of method '{task.cfg.method.name}' needs "
            "more than the sum of the clients' tensors (its own aggregation, or a round of "
            "several exchanges); secure aggregation serves full, head, bias, adapter, prompt "
            "and lora (aggregation=mean, one rank)"
        )
    return server


LOCAL_SECURE_AGGREGATION = (
    "federation.secure_aggregation runs on a Flower deployment (`flwr run flower-app ...`): the "
    "local engine holds every client in one process, so no party is kept from any update"
)


def refuse_non_finite(server: Server, round_number: int) -> None:
    """Stop before a non-finite global state is checkpointed: the last good one stays."""
    bad = [n for n, t in server.model_state().items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise RunStopped(
            f"round {round_number}: the new global state holds non-finite values "
            f"({', '.join(bad[:3])}); the checkpoint of round {round_number - 1} is kept. "
            "Lower train.lr or federation.server_lr, then --resume"
        )


def checkpoint_state(
    server: Server, runtime: ClientRuntime | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What a round's checkpoint holds: the server's state and, on the local engine, what every
    client keeps between rounds (a resumed run's clients must hold what they held, or they are
    sent, and count, more than an unbroken run's)."""
    tensors, server_meta = server.state_dict()
    meta: dict[str, Any] = {"server": server_meta}
    if runtime is not None:
        client_tensors, meta["clients"] = runtime.state_dict()
        clash = sorted(set(tensors) & set(client_tensors))
        if clash:  # a server must not name its tensors as client states are named
            raise RuntimeError(f"checkpoint names used by both server and clients: {clash[:3]}")
        tensors.update(client_tensors)
    return tensors, meta


def restore_state(
    server: Server,
    runtime: ClientRuntime | None,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    """Put a checkpoint back. The clients' states come back only where they live in this
    process and the checkpoint holds them; otherwise (a Flower federation, whose nodes keep
    their own state but may have restarted unseen) the server forgets what clients held and
    sends each one what a new client gets, which costs bytes an unbroken run would not spend."""
    own = {k: v for k, v in tensors.items() if not k.startswith(CLIENT)}
    server.load_state_dict(own, meta["server"])
    if runtime is not None and "clients" in meta:
        clients = {k: v for k, v in tensors.items() if k.startswith(CLIENT)}
        runtime.load_state_dict(clients, meta["clients"])
    else:
        server.forget_client_state()


def run_federation(
    task: Task,
    run_dir: Path,
    resume: bool = False,
    progress: Progress | None = None,
    grid: Grid | None = None,
    server: Server | None = None,
) -> dict[str, Any]:
    """Run (or continue) the rounds; writes metrics, checkpoint, summary and plot into `run_dir`.

    `grid` carries the messages: by default every client runs in this process (the local engine);
    the Flower adapter passes a grid over a real federation. `server`: one already made (so its
    checks ran before the run folder was created)."""
    cfg = task.cfg
    server = server or make_server(task)
    fingerprint = run_fingerprint(task)
    runtime: ClientRuntime | None = None  # the clients, when they live in this process
    if grid is None:
        if cfg.federation.secure_aggregation:
            raise ConfigError(LOCAL_SECURE_AGGREGATION)
        runtime = ClientRuntime(task.method, task.model, task.data, cfg, task.device)
        grid = LocalGrid(runtime, task.device, on_reply=progress.client_done if progress else None)
    first_round, history = 1, []
    initial: dict[str, Any] | None = None
    if resume:
        tensors, meta = rundir.load_checkpoint(run_dir)
        check_fingerprint(meta.get("fingerprint"), fingerprint, run_dir)
        done = int(meta["round"])
        if cfg.federation.rounds < done:
            raise ConfigError(
                f"--resume {run_dir}: federation.rounds={cfg.federation.rounds} is fewer than the "
                f"{done} rounds already completed; give at least {done}"
            )
        rundir.clean_temporaries(run_dir)
        rundir.write_config(run_dir, cfg)  # the one change resume allows: more rounds
        restore_state(server, runtime, tensors, meta)
        first_round = done + 1
        history = rundir.truncate_metrics(run_dir, done)
        initial = meta.get("initial")
    elif wants_initial_eval(task):
        initial = evaluate_initial(task, server)
    totals = Totals.from_history(history)
    rounds = cfg.federation.rounds
    if progress:
        progress.start(rounds, first_round, clients_per_round(cfg.federation))
    try:
        for round_number in range(first_round, rounds + 1):
            started = time.perf_counter()
            clients = round_participants(cfg, round_number)
            try:
                outcome = server.run_round(round_number, grid, clients)
            except BudgetSpent as exc:
                log.warning("%s", exc)
                totals.stopped = str(exc)
                break
            refuse_non_finite(server, round_number)
            round_seconds = time.perf_counter() - started
            line = round_line(
                round_number,
                outcome.replies,
                outcome.metrics,
                totals,
                task.trainable_params,
                task.model.task.headline,
            )
            line["server_seconds"] = max(
                0.0, round_seconds - sum(r.cost.seconds for r in outcome.replies)
            )
            eval_seconds = 0.0
            if round_number % cfg.federation.eval_every == 0 or round_number == rounds:
                eval_start = time.perf_counter()
                line.update(evaluate_global(task, server))
                eval_seconds = time.perf_counter() - eval_start
            line["eval_seconds"] = eval_seconds
            line["round_seconds"] = round_seconds + eval_seconds
            totals.elapsed_seconds += line["round_seconds"]
            line["elapsed_seconds"] = totals.elapsed_seconds
            line = privacy_view(cfg.privacy, line)
            totals.history.append(line)
            rundir.append_metrics(run_dir, line)
            tensors, state_meta = checkpoint_state(server, runtime)
            extra = {"initial": initial} if initial is not None else {}
            rundir.save_checkpoint(
                run_dir,
                tensors,
                {"round": round_number, **state_meta, **extra, "fingerprint": fingerprint},
            )
            if progress:
                progress.round_done(line)
        client_eval = evaluate_clients(task, server, grid, rounds + 1)
    finally:
        if progress:
            progress.close()
    summary = {**make_summary(task, run_dir, totals, client_eval, initial), **server.summary()}
    rundir.write_summary(run_dir, summary)
    title = f"{cfg.method.name} on {cfg.data.source} ({cfg.federation.clients} clients)"
    objective = task.model.task
    baseline = None
    if initial is not None and initial.get(f"test_{objective.headline}") is not None:
        baseline = ("untuned", initial[f"test_{objective.headline}"])
    elif objective.headline == "accuracy" and task.data.num_labels:
        baseline = ("chance", 1 / task.data.num_labels)
    plot_metric(
        totals.history, run_dir / rundir.plot_name(objective.headline), title,
        objective.headline, baseline,
    )  # fmt: skip
    return summary
