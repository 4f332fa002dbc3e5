"""The Flower engine: real SuperLink and SuperNode processes on 127.0.0.1, and Flower's simulation
engine. Each test stops every process it started by its PID."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from fedft.federation import flower
from fedft.federation.loopback import Federation
from fedft.federation.training import derived_seed
from fedft.metrics import rundir

from helpers import local_run, sets_string, write_generation_data

pytestmark = pytest.mark.slow

BASE = {
    "model.name": "tiny-bert",
    "model.max_length": 16,
    "data.max_train_samples": 200,
    "data.max_test_samples": 60,
    "federation.clients": 2,
    "federation.rounds": 2,
    "federation.sample_fraction": 1.0,
    "train.max_steps": 2,
}


def own_dataset(folder: Path, rows: int = 60) -> Path:
    """A node's own dataset: a folder with a train.csv of the demo's 8 classes."""
    folder.mkdir(parents=True)
    lines = [f"row {i} about topic {i % 4},{i % 8}" for i in range(rows)]
    (folder / "train.csv").write_text("text,label\n" + "\n".join(lines) + "\n")
    return folder


def run_and_kill_node1_after_round_one(fed: Federation, sets: dict) -> str:
    """Start the run, kill SuperNode 'node1' once round 1 is checkpointed, return the end status."""
    run_id = fed.run_app(f'fedft-set="{sets_string(sets)}"')
    checkpoint = Path(sets["output_dir"]) / sets["name"] / rundir.CHECKPOINT
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    fed.kill("node1")
    return fed.wait(run_id)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("flower"))
    try:
        fed.start_superlink()
        fed.start_supernode("node0", "partition-id=0 num-partitions=2")
        fed.start_supernode("node1", "partition-id=1 num-partitions=2")
        yield fed
    finally:
        fed.stop()
    assert all(p.poll() is not None for p in fed.procs.values())


# Each message starts a ClientApp process (seconds each), so a case takes two rounds only where
# the second round differs from the first (zo's catch-up records, fedpft's re-aligned slices).
ONE_ROUND = {"federation.rounds": 1}
# seeded noise, so that the federation can be compared with the local engine run for run (a
# private run's noise is secret, and two runs never draw the same)
DP_SAMPLE = {
    "privacy.mode": "sample",
    "privacy.epsilon": 8,
    "privacy.reproducible_noise_not_private": True,
}
# two SuperNodes, one round: three exchanges (start, tail, head) with one chunk of two batches
SPLIT = {"method.num_tokens": 3, "method.head_blocks": 0, "federation.rounds": 1}
# round 1 ships the whole sub-model and collects neuron activity; round 2 ships re-aligned slices,
# which a fresh ClientApp process applies on the copy the node kept in its state
PROXY = {
    "method.keep_layers": [0],
    "method.distill_steps": 5,
    "method.realign_every": 1,
    "method.realign_steps": 3,
    "method.public_rows": 40,
}
# the large model (all of tiny-bert, zero-shot) stays with the ServerApp; nodes tune block 0
STEERED = {"method.small_layers": 1, "method.distill_steps": 5, "method.public_rows": 40}


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("zo", {}),
        ("lora", {**DP_SAMPLE, **ONE_ROUND}),
        ("sfprompt", SPLIT),
        ("fedpft", PROXY),
        ("fedpt", {**STEERED, **ONE_ROUND}),
    ],
    ids=["zo", "lora-dp", "sfprompt", "fedpft", "fedpt"],
)
def test_deployment_runs_and_counts_the_same_bytes_as_the_local_engine(
    federation, tmp_path: Path, method: str, extra: dict
):
    sets = {
        **BASE,
        **extra,
        "method.name": method,
        "name": f"flower-{method}",
        "output_dir": str(tmp_path / "runs"),
    }
    run_id = federation.run_app(f'fedft-set="{sets_string(sets)}"')
    run_dir = tmp_path / "runs" / f"flower-{method}"
    status = federation.wait(run_id, done_file=run_dir / rundir.SUMMARY)
    assert status == "finished:completed", federation.logs(run_id)
    lines = rundir.read_metrics(run_dir)
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    rounds = sets["federation.rounds"]
    assert [m["round"] for m in lines] == list(range(1, rounds + 1))
    assert summary["rounds_completed"] == rounds
    assert summary["engine"] == "flower" and summary["final_accuracy"] is not None
    assert all(not m["failed"] and m["clients"] == [0, 1] for m in lines)
    if method == "fedpft":  # round 2 shipped slices only, which the nodes applied to their copy
        assert lines[1]["submodel_bytes"] == 0 and lines[1]["realign_bytes"] > 0

    local_summary, local_lines = local_run(tmp_path, {**BASE, **extra, "method.name": method})
    assert summary["privacy"] == local_summary["privacy"]  # the ledger counts the same steps
    for flower_line, local_line in zip(lines, local_lines, strict=True):
        assert [c["bytes_up"] for c in flower_line["per_client"]] == [
            c["bytes_up"] for c in local_line["per_client"]
        ]
        assert flower_line["round_bytes"] == local_line["round_bytes"]
    assert (
        summary["bytes_up_per_client_per_round"] == local_summary["bytes_up_per_client_per_round"]
    )
    # same seeds, same code: the federation reaches the local engine's model
    assert summary["final_loss"] == pytest.approx(local_summary["final_loss"], rel=1e-4)
    assert summary["wire_bytes"] > summary["total_bytes"]  # serialised records carry headers too
    assert (run_dir / rundir.CHECKPOINT).exists() and (run_dir / rundir.PLOT).exists()


def test_a_generative_run_on_the_deployment_matches_the_local_engine(federation, tmp_path: Path):
    """tiny-llama tuned with LoRA on instruction rows by two SuperNodes: the same bytes and the
    same response loss as the local engine."""
    data = write_generation_data(tmp_path / "gen")
    sets = {
        **BASE,
        "model.name": "tiny-llama",
        "model.max_length": 48,
        "data.source": str(data),
        "data.label_column": "topic",
        "data.max_train_samples": None,
        "data.max_test_samples": None,
        "task.eval_generations": 2,
        "task.client_eval_generations": 1,
        "task.max_new_tokens": 3,
        "method.name": "lora",
        **ONE_ROUND,
    }
    flower_sets = {**sets, "name": "flower-gen", "output_dir": str(tmp_path / "runs")}
    run_id = federation.run_app(f'fedft-set="{sets_string(flower_sets)}"')
    run_dir = tmp_path / "runs" / "flower-gen"
    status = federation.wait(run_id, done_file=run_dir / rundir.SUMMARY)
    assert status == "finished:completed", federation.logs(run_id)
    lines = rundir.read_metrics(run_dir)
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert summary["headline"] == "rouge_l" and summary["final_rouge_l"] is not None
    local_summary, local_lines = local_run(tmp_path, sets)
    assert [m["round_bytes"] for m in lines] == [m["round_bytes"] for m in local_lines]
    assert summary["final_loss"] == pytest.approx(local_summary["final_loss"], rel=1e-4)
    assert summary["initial"]["test_loss"] == pytest.approx(
        local_summary["initial"]["test_loss"], rel=1e-6
    )


def test_a_supernode_killed_mid_run_is_recorded_and_the_run_completes(tmp_path: Path):
    # node0 brings its own dataset (node config data-path); node1 a share of the shared source
    own = own_dataset(tmp_path / "node0-data")
    fed = Federation(tmp_path / "fed")
    try:
        fed.start_superlink()
        fed.start_supernode("node0", f'partition-id=0 num-partitions=2 data-path="{own}"')
        fed.start_supernode("node1", "partition-id=1 num-partitions=2")
        sets = {
            **BASE,
            "federation.rounds": 2,  # round 2 waits reply_timeout for the killed node
            # each node's warm worker (torch, the model, the data) starts at the hello exchange
            # and may still be loading in round 1: beside the other tests in parallel that took
            # over 20 s once, and the run stopped in round 1
            "federation.reply_timeout": 45,
            "method.name": "bias",
            "name": "killed",
            "output_dir": str(tmp_path / "runs"),
        }
        status = run_and_kill_node1_after_round_one(fed, sets)
        assert status == "finished:completed"
    finally:
        fed.stop()
    assert all(p.poll() is not None for p in fed.procs.values())
    lines = rundir.read_metrics(tmp_path / "runs" / "killed")
    assert [m["round"] for m in lines] == [1, 2]
    assert not lines[0]["failed"]
    node0 = [c for c in lines[0]["per_client"] if c["client"] == 0][0]
    # its own 60 rows, read like data.source: 20% held out as its test split, then 10% local test
    assert node0["num_examples"] == 43
    lost = [f for m in lines[1:] for f in m["failed"]]
    assert lost and all(f["client"] == 1 for f in lost)
    assert all(m["test_accuracy"] is not None for m in lines)
    summary = json.loads((tmp_path / "runs" / "killed" / rundir.SUMMARY).read_text())
    assert summary["failed_client_updates"] == len(lost)


def test_four_clients_on_flowers_simulation_engine(tmp_path: Path):
    pytest.importorskip(
        "ray", reason="Flower's simulation engine needs the 'simulation' extra (ray)"
    )
    fed = Federation(tmp_path / "fed", simulation=True)
    try:
        fed.start_superlink()
        sets = {
            **BASE,
            "federation.clients": 4,
            "method.name": "lora",
            "name": "sim",
            "output_dir": str(tmp_path / "runs"),
        }
        run_id = fed.run_app(
            f'fedft-set="{sets_string(sets)}"',
            federation_config="num-supernodes=4 client-resources-num-cpus=1",
        )
        assert fed.wait(run_id) == "finished:completed", fed.logs(run_id)
    finally:
        fed.stop()
    assert all(p.poll() is not None for p in fed.procs.values())
    lines = rundir.read_metrics(tmp_path / "runs" / "sim")
    assert [m["round"] for m in lines] == [1, 2]
    assert all(m["clients"] == [0, 1, 2, 3] and not m["failed"] for m in lines)
    local_summary, _ = local_run(tmp_path, {**BASE, "federation.clients": 4, "method.name": "lora"})
    summary = json.loads((tmp_path / "runs" / "sim" / rundir.SUMMARY).read_text())
    assert (
        summary["bytes_up_per_client_per_round"] == local_summary["bytes_up_per_client_per_round"]
    )
    assert summary["final_loss"] == pytest.approx(local_summary["final_loss"], rel=1e-4)


def test_too_few_replies_stop_the_flower_run_with_its_checkpoint_intact(tmp_path: Path):
    fed = Federation(tmp_path / "fed")
    try:
        fed.start_superlink()
        fed.start_supernode("node0", "partition-id=0 num-partitions=2")
        fed.start_supernode("node1", "partition-id=1 num-partitions=2")
        sets = {
            **BASE,
            "federation.rounds": 3,
            "federation.min_replies": 2,
            "federation.reply_timeout": 30,  # a ClientApp process starts torch and the task: slow under load
            "method.name": "bias",
            "name": "stopped",
            "output_dir": str(tmp_path / "runs"),
        }
        run_dir = tmp_path / "runs" / "stopped"
        assert run_and_kill_node1_after_round_one(fed, sets) == "finished:failed"
    finally:
        fed.stop()
    message = (run_dir / "stopped.txt").read_text()
    assert "round 2: only 1 of 2 clients answered, fewer than federation.min_replies=2" in message
    _, meta = rundir.load_checkpoint(run_dir)
    assert meta["round"] == 1 and [m["round"] for m in rundir.read_metrics(run_dir)] == [1]
    assert not (run_dir / rundir.SUMMARY).exists()


def test_nodes_with_their_own_data_run_as_the_clients_their_partition_ids_name(tmp_path: Path):
    # Two nodes bring the same rows, each in its own folder: all that tells them apart is the
    # client id, so whatever differs between them comes from it (seeds, directions, state).
    paths = [own_dataset(tmp_path / f"node{i}-data") for i in (0, 1)]
    fed = Federation(tmp_path / "fed")
    try:
        fed.start_superlink()
        for i, path in enumerate(paths):
            fed.start_supernode(f"node{i}", f'partition-id={i} num-partitions=2 data-path="{path}"')
        sets = {
            **BASE,
            "federation.rounds": 3,
            "method.name": "zo",
            "method.params": "bias",
            "name": "own-data",
            "output_dir": str(tmp_path / "runs"),
        }
        run_id = fed.run_app(f'fedft-set="{sets_string(sets)}"')
        assert fed.wait(run_id) == "finished:completed", fed.logs(run_id)
    finally:
        fed.stop()
    run_dir = tmp_path / "runs" / "own-data"
    lines = rundir.read_metrics(run_dir)
    assert [m["round"] for m in lines] == [1, 2, 3]
    # round 3 replays onto the version each node kept in its own context.state (held since
    # round 2); a node that had lost it, or held another's, would fail out of sync
    assert all(m["clients"] == [0, 1] and not m["failed"] for m in lines)
    assert all(c["num_examples"] == 43 for m in lines for c in m["per_client"])
    # zo uploads the seeds of its directions, derived from (run seed, round, client): each
    # round's record holds client 0's seeds and then client 1's, not client 0's twice
    records = load_file(str(run_dir / rundir.CHECKPOINT))
    steps = BASE["train.max_steps"]
    for round_number in (1, 2, 3):
        expected = [
            derived_seed(derived_seed(0, round_number, client), step, 0)
            for client in (0, 1)
            for step in range(steps)
        ]
        assert records[f"record.{round_number - 1}.seeds"].tolist() == expected


def node_context(run_config: dict, node_config: dict) -> Context:
    return Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def test_client_runtimes_are_one_per_data_source_and_at_most_two(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(flower, "_RUNTIMES", OrderedDict())
    run_config = {"fedft-set": sets_string({**BASE, "method.name": "bias"})}
    a, b = (str(own_dataset(tmp_path / name)) for name in ("a", "b"))

    def runtime(**node: object) -> flower.ClientRuntime:
        return flower._client_runtime(node_context(run_config, node))

    # every partition of the shared source is served by one runtime (its data holds them all)
    shared = runtime(**{"partition-id": 0, "num-partitions": 2})
    assert runtime(**{"partition-id": 1, "num-partitions": 2}) is shared
    assert shared.split is None
    # own-data nodes: one runtime per data-path, whichever client the node is
    own_a = runtime(**{"partition-id": 0, "data-path": a})
    assert runtime(**{"partition-id": 1, "data-path": a}) is own_a
    assert own_a is not shared and own_a.split is not None
    assert own_a.cfg.federation.clients == 2  # the run's federation, though it holds one split
    assert runtime(**{"partition-id": 1, "num-partitions": 2}) is shared  # now the most recent
    own_b = runtime(**{"partition-id": 0, "data-path": b})
    # bounded: the least recently used (own_a) went, the other two stay
    assert list(flower._RUNTIMES.values()) == [shared, own_b]
    assert runtime(**{"partition-id": 0, "data-path": a}) is not own_a
    assert len(flower._RUNTIMES) == flower.MAX_RUNTIMES
