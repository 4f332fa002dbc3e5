"""`fedpt` over a vocabulary (tiny-llama pairs): the proxy's logits are large + α(tuned − untuned)
at the scored positions, decoding with left padding and the sources' caches gives what each row
alone would, the served large model answers what the local one does, α is chosen on the server's
validation rows (never the test split, never a client's row), and a federated run scores the
proxy, the small model and the large model alone."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from fedft.data import hold_out_server_rows
from fedft.data.sources import RawData
from fedft.errors import ConfigError, ModelError
from fedft.federation.engine import build_task, run_federation
from fedft.federation.training import evaluate, read_state
from fedft.methods.fedpt.alpha import best_alpha
from fedft.methods.fedpt.logits import (
    HttpLogitsSource,
    LocalCausalLM,
    QueryCounter,
    positions,
    serve_logits,
)
from fedft.methods.fedpt.proxy import CausalProxy, proxy_generate
from fedft.metrics import rundir
from fedft.models.backbone import load_like
from fedft.models.zero_shot import keep_blocks

from helpers import tiny_config

LLAMA = {
    "model.max_length": 48,
    "method.small_layers": 1,
    "data.max_train_samples": 160,
    "data.max_test_samples": 12,
    "data.server_rows": 12,
    "method.alpha_grid": [0.0, 1.0, 2.0],
    "federation.clients": 3,
    "federation.rounds": 2,
    "train.batch_size": 8,
    "train.max_steps": 2,
}


def llama_task(tmp_path: Path, **sets):
    """SST-like demo rows as label words on tiny-llama (2 blocks); the small model: 1 block."""
    return build_task(tiny_config(tmp_path, "fedpt", "tiny-llama", **{**LLAMA, **sets}))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    task = llama_task(tmp_path_factory.mktemp("pair"))
    server = task.method.make_server(task.cfg, read_state(task.model, task.method.trainable_names))
    generator = torch.Generator().manual_seed(5)  # a tuned small model: LoRA moved off its start
    server.global_state = {
        k: v + 0.5 * torch.randn(v.shape, generator=generator)
        for k, v in server.global_state.items()
    }
    server.evaluation_models(task.model)  # writes the global state into the server's small model
    return task, server


def by_hand(net, batch, keep):
    mask = batch["attention_mask"]
    with torch.no_grad():
        out = net(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions(mask))
    return out.logits[:, -keep:].float()


def test_the_proxy_is_large_plus_alpha_times_the_small_models_difference(pair):
    task, server = pair
    batch = task.data.test.batch(np.arange(6))
    keep = task.model.task.kept_positions(batch)
    large = by_hand(server.large.source.net, batch, keep)
    tuned, untuned = (
        by_hand(server.small.net, batch, keep),
        by_hand(server.untuned.net, batch, keep),
    )
    assert (tuned - untuned).abs().max() > 1e-3  # the pair really differs
    for alpha in (0.0, 0.5, 2.0):
        proxy = CausalProxy(task.model.task, server.large, server.small, server.untuned, alpha)
        torch.testing.assert_close(
            proxy(batch), large + alpha * (tuned - untuned), rtol=1e-4, atol=1e-4
        )
    alone = CausalProxy(task.model.task, server.large)
    torch.testing.assert_close(alone(batch), large, rtol=1e-5, atol=1e-5)


def test_decoding_left_padded_rows_with_caches_gives_each_row_alone(pair):
    task, server = pair
    tokenizer = task.model.preprocess.tokenizer
    sources = [
        server.large,
        LocalCausalLM(server.small.net, tokenizer),
        LocalCausalLM(server.untuned.net, tokenizer),
    ]
    prompts = [[1, 30, 31, 32, 33, 34], [1, 40, 41]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros((2, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    together = proxy_generate(*sources, ids, 5, alpha=1.5, attention_mask=mask)[:, width:]
    for i, p in enumerate(prompts):
        alone = proxy_generate(*sources, torch.tensor([p]), 5, alpha=1.5)[:, len(p) :]
        assert torch.equal(together[i], alone[0])
        # and each token is the argmax of the proxy logits computed from scratch (no cache)
        seq = list(p)
        for token in alone[0].tolist():
            step = {"input_ids": torch.tensor([seq]), "attention_mask": torch.ones(1, len(seq))}
            nets = (server.large.source.net, server.small.net, server.untuned.net)
            large, tuned, untuned = (by_hand(n, step, 1)[:, -1] for n in nets)
            assert token == int((large + 1.5 * (tuned - untuned)).argmax())
            seq.append(token)


def test_a_row_that_stops_is_padded_and_decoding_ends_when_all_stop(pair):
    task, server = pair
    tokenizer = task.model.preprocess.tokenizer
    small = LocalCausalLM(server.small.net, tokenizer)
    prompt = torch.tensor([[1, 30, 31], [1, 40, 41]])
    free = proxy_generate(server.large, small, small, prompt, 4, alpha=0.0)[:, 3:]
    stop = int(free[0, 1])  # make the first row's second token a stop token
    pad = tokenizer.pad_token_id
    out = proxy_generate(
        server.large, small, small, prompt, 4, alpha=0.0, stop_ids=[stop], pad_id=pad
    )[:, 3:]
    row = out[0].tolist()
    end = row.index(stop) + 1
    assert row[:end] == free[0, :end].tolist()
    assert end < 4 and all(t == pad for t in row[end:])
    # when every row has stopped, decoding ends
    first = [int(t) for t in free[:, 0]]
    out = proxy_generate(server.large, small, small, prompt, 4, alpha=0.0, stop_ids=first)
    assert out.shape == (2, 4)


def test_the_served_large_model_answers_what_the_local_one_does(pair):
    task, server = pair
    http = serve_logits(server.large.source)
    try:
        url = f"http://127.0.0.1:{http.server_address[1]}"
        remote = QueryCounter(HttpLogitsSource(url))
        assert remote.space == server.large.space
        batch = task.data.test.batch(np.arange(4))
        keep = task.model.task.kept_positions(batch)
        local = server.large.source.sequence_logits(
            batch["input_ids"], batch["attention_mask"], keep
        )
        served = remote.sequence_logits(batch["input_ids"], batch["attention_mask"], keep)
        assert torch.equal(local, served)
        assert remote.queries == 4
        # what crossed the wire: the float32 answer and the JSON request, nothing else
        assert remote.query_bytes > local.numel() * 4
        assert remote.query_bytes < local.numel() * 4 + 20_000
    finally:
        http.shutdown()


def test_alpha_is_chosen_on_the_validation_rows_by_their_own_scores(pair):
    task, server = pair
    assert server.validation is task.data.validation and len(task.data.validation) == 12
    metrics = server.choose_alpha(1)
    curve = server.alpha_curves[-1]["curve"]
    assert [p["alpha"] for p in curve] == [0.0, 1.0, 2.0]
    for point in curve:  # each point is that α's proxy scored on the validation rows, no others
        proxy = CausalProxy(task.model.task, server.large, server.small, server.untuned,
                            point["alpha"])  # fmt: skip
        stats = evaluate(proxy, task.data.validation, None, 32, task.device).metrics
        assert point["accuracy"] == pytest.approx(stats["accuracy"])
        assert point["loss"] == pytest.approx(stats["loss"], rel=1e-4)
    assert metrics["alpha"] == server.alpha == best_alpha(curve)
    best = max(p["accuracy"] for p in curve)
    chosen = [p for p in curve if p["alpha"] == server.alpha][0]
    assert chosen["accuracy"] == best
    assert chosen["loss"] == min(p["loss"] for p in curve if p["accuracy"] == best)


def test_server_rows_are_held_by_no_client_and_are_not_the_test_split():
    rows = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(50)], "label": [0] * 50})
    test = datasets.Dataset.from_dict({"text": ["t"], "label": [0]})
    raw = RawData("text", rows, test, ["a"], "hand-made")
    kept, held = hold_out_server_rows(raw, 8, seed=3)
    assert held is not None and len(held.train) == 8 and len(kept.train) == 42
    assert not set(held.train["text"]) & set(kept.train["text"])
    assert sorted([*held.train["text"], *kept.train["text"]]) == sorted(rows["text"])
    assert kept.test is test  # the test split is untouched
    assert hold_out_server_rows(raw, 100, seed=3)[1].train.num_rows == 10  # at most a fifth


def test_alpha_auto_without_server_rows_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="data.server_rows"):
        llama_task(tmp_path, **{"data.server_rows": 0})


def test_a_federated_run_scores_the_proxy_the_small_model_and_the_large_model(tmp_path: Path):
    cfg = tiny_config(tmp_path, "fedpt", "tiny-llama", **{**LLAMA, "federation.eval_initial": True})
    task = build_task(cfg)
    assert len(task.data.validation) == 12
    assert sum(len(c.train) + len(c.test) for c in task.data.clients) == 148
    run_dir, lock = rundir.new_run_dir(cfg, overwrite=False)
    try:
        summary = run_federation(task, run_dir)
    finally:
        lock.release()
    lines = rundir.read_metrics(run_dir)
    names = task.method.trainable_names
    assert names and all(".lora_" in n for n in names)
    assert len(task.model.blocks()) == 1  # clients hold the small model
    for line in lines:
        assert line["bytes_up"] == 2 * task.trainable_bytes  # 2 clients a round
        assert line["alpha"] in (0.0, 1.0, 2.0)
        for key in ("test_accuracy", "small_test_accuracy", "large_test_accuracy"):
            assert 0 <= line[key] <= 1
    # the large model alone is frozen: scored once (before round 1), its scores kept
    first = summary["initial"]
    assert lines[-1]["large_test_accuracy"] == first["large_test_accuracy"]
    assert lines[-1]["large_queries_eval"] < first["large_queries_eval"]
    assert summary["fedpt"]["alpha"] == lines[-1]["alpha"]
    assert len(summary["fedpt"]["alpha_curves"]) == 2


def test_layer_drop_keeps_the_chosen_blocks_and_decodes_with_a_cache(pair):
    task, _ = pair
    model = load_like(task.model, task.cfg)  # tiny-llama, both blocks
    second = {k: v.clone() for k, v in model.blocks()[1].state_dict().items()}
    keep_blocks(model, [1])
    assert len(model.blocks()) == 1 and model.net.config.num_hidden_layers == 1
    kept = model.blocks()[0]
    assert all(torch.equal(v, second[k]) for k, v in kept.state_dict().items())
    assert kept.self_attn.layer_idx == 0  # renumbered for the key/value cache
    tokenizer = task.model.preprocess.tokenizer
    sources = [LocalCausalLM(model.net, tokenizer) for _ in range(2)]
    prompt = [1, 30, 31, 32]
    out = proxy_generate(*sources, sources[1], torch.tensor([prompt]), 4, alpha=0.0)
    seq = list(prompt)
    for token in out[0, len(prompt) :].tolist():
        step = {"input_ids": torch.tensor([seq]), "attention_mask": torch.ones(1, len(seq))}
        assert token == int(by_hand(model.net, step, 1)[0, -1].argmax())
        seq.append(token)
    with pytest.raises(ModelError, match="distinct block indices in order"):
        keep_blocks(load_like(task.model, task.cfg), [1, 0])
