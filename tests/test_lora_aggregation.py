"""LoRA aggregation: `mean` is FedAvg of the factors and says how much it misses; `exact` makes the
global model the clients' weighted mean (random tensors, a non-square module, ranks 4/8/16
together); the server's scale is the model's; padded clients train and send only their slots."""

from pathlib import Path

import pytest
import torch

from fedft.errors import ConfigError
from fedft.federation.client import ClientRuntime
from fedft.federation.engine import build_task
from fedft.federation.grid import LocalGrid
from fedft.federation.payload import ClientCost, Payload, Reply
from fedft.federation.training import write_state
from fedft.methods import get_method
from fedft.methods.lora.aggregation import lora_pairs, pad, product
from fedft.methods.lora.server import LoraServer

from helpers import tiny_config

D_OUT, D_IN, ALPHA = 5, 7, 16.0  # non-square: a transposed product cannot match


def _factors(g: torch.Generator, rank: int) -> dict[str, torch.Tensor]:
    return {
        "m.lora_A.default.weight": torch.randn(rank, D_IN, generator=g),
        "m.lora_B.default.weight": torch.randn(D_OUT, rank, generator=g),
        "head.weight": torch.randn(3, 4, generator=g),
    }


def _server(tmp_path: Path, exact: bool, ranks: list[int] | None, rank: int) -> LoraServer:
    g = torch.Generator().manual_seed(1)
    server = LoraServer(
        tiny_config(tmp_path),
        _factors(g, rank),
        rank=rank,
        scale=ALPHA / rank,
        exact=exact,
        client_ranks=ranks,
    )
    if exact:  # a residual carried from earlier rounds
        server.global_state["m.base_residual"] = torch.randn(D_OUT, D_IN, generator=g)
    return server


def _effective(state: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """W − W0 of the module: R + s·B·A (R = 0 where there is none)."""
    a, b = state["m.lora_A.default.weight"], state["m.lora_B.default.weight"]
    residual = state.get("m.base_residual", torch.zeros(D_OUT, D_IN)).double()
    return residual + product(a, b, scale)


def _replies(server: LoraServer, clients: list[int], seed: int) -> list[Reply]:
    """Each client trains from what it is sent: its factors move to random values of its rank."""
    g = torch.Generator().manual_seed(seed)
    replies = []
    for c in clients:
        sent = server.train_payload(c, 1).tensors
        trained = _factors(g, server.client_rank(c))
        scalars = {"num_examples": 10 * (c + 1)}
        reply = Reply(c, "train", Payload(trained, scalars), None, ClientCost())
        reply.sent = sent
        replies.append(reply)
    return replies


@pytest.mark.parametrize("ranks", [None, [4, 8, 16]], ids=["one-rank", "ranks-4-8-16"])
def test_exact_global_model_is_the_weighted_mean_of_the_clients_models(
    tmp_path: Path, ranks: list[int] | None
):
    server = _server(tmp_path, exact=True, ranks=ranks, rank=16 if ranks else 8)
    s = server.scale
    before = _effective(server.global_state, s)
    clients = [0, 1, 2, 3]
    replies = _replies(server, clients, seed=2)
    for reply in replies:  # every client starts from the global model itself, whatever its rank
        torch.testing.assert_close(_effective(reply.sent, s), before, rtol=0, atol=1e-5)
    weights = [float(r.payload.scalars["num_examples"]) for r in replies]
    by_hand = sum(
        w * (r.sent["m.base_residual"].double() + product(*_ar(r), s))
        for r, w in zip(replies, weights, strict=True)
    ) / sum(weights)
    aggregate, metrics = server.aggregate(replies, 1)
    torch.testing.assert_close(_effective(aggregate, s), by_hand, rtol=0, atol=1e-5)
    heads = sum(w * r.payload.tensors["head.weight"] for r, w in zip(replies, weights, strict=True))
    torch.testing.assert_close(aggregate["head.weight"], heads / sum(weights))
    assert metrics["lora_factor_gap"] > 0  # the residual carries what the factor means miss
    assert list(aggregate) == list(server.global_state)


def _ar(reply: Reply) -> tuple[torch.Tensor, torch.Tensor]:
    return reply.payload.tensors["m.lora_A.default.weight"], reply.payload.tensors[
        "m.lora_B.default.weight"
    ]


def test_mean_averages_the_factors_and_reports_what_it_misses(tmp_path: Path):
    server = _server(tmp_path, exact=False, ranks=None, rank=4)
    replies = _replies(server, [0, 1, 2], seed=3)
    weights = [10.0, 20.0, 30.0]
    aggregate, metrics = server.aggregate(replies, 1)
    a_mean = sum(w * _ar(r)[0] for r, w in zip(replies, weights, strict=True)) / 60
    b_mean = sum(w * _ar(r)[1] for r, w in zip(replies, weights, strict=True)) / 60
    torch.testing.assert_close(aggregate["m.lora_A.default.weight"], a_mean)
    torch.testing.assert_close(aggregate["m.lora_B.default.weight"], b_mean)
    wanted = sum(w * product(*_ar(r), server.scale) for r, w in zip(replies, weights, strict=True))
    wanted = wanted / 60
    got = product(a_mean, b_mean, server.scale)
    gap = float((wanted - got).norm() / wanted.norm())
    assert gap > 0.1  # mean(B)·mean(A) is far from mean(B·A) for unrelated clients
    assert metrics["lora_factor_gap"] == pytest.approx(gap, rel=1e-6)
    assert "m.base_residual" not in aggregate


def test_mixed_ranks_average_each_slot_over_its_holders(tmp_path: Path):
    server = _server(tmp_path, exact=False, ranks=[4, 8, 16], rank=16)
    sent = [server.train_payload(c, 1).tensors for c in (0, 1, 2)]
    assert [t["m.lora_A.default.weight"].shape[0] for t in sent] == [4, 8, 16]
    assert [t["m.lora_B.default.weight"].shape[1] for t in sent] == [4, 8, 16]
    replies = _replies(server, [0, 1, 2], seed=4)
    aggregate, _ = server.aggregate(replies, 1)
    a = aggregate["m.lora_A.default.weight"]
    a0, a1, a2 = (_ar(r)[0] for r in replies)
    torch.testing.assert_close(a[12], a2[12])  # only the rank-16 client holds slot 12
    torch.testing.assert_close(a[6], (20 * a1[6] + 30 * a2[6]) / 50)
    torch.testing.assert_close(a[1], (10 * a0[1] + 20 * a1[1] + 30 * a2[1]) / 60)


def _probe(model, module_name: str) -> torch.Tensor:
    """The linear map a module computes, read off by feeding it the identity (bias removed)."""
    module = model.get_submodule(module_name)
    eye = torch.eye(module.in_features)
    with torch.no_grad():
        return (module(eye) - module(torch.zeros_like(eye))).T.double()


def test_real_round_exact_with_ranks_equals_the_mean_of_the_trained_clients(tmp_path: Path):
    """tiny-bert, LoRA r = 4, clients of rank 2 and 4 training for real: the global module after
    the round computes the weighted mean of the maps the clients' modules computed; the server's
    scale is the one peft applies; a rank-2 client sends half the factor bytes."""
    sets = {"method.r": 4, "method.aggregation": "exact", "method.client_ranks": [2, 4]}
    cfg = tiny_config(tmp_path, "lora", **sets)
    task = build_task(cfg)
    runtime = ClientRuntime(task.method, task.model, task.data, cfg, task.device)
    grid = LocalGrid(runtime, task.device)
    names = task.method.trainable_names
    server = task.method.make_server(cfg, {n: p.detach().clone() for n, p in
                                           task.model.named_parameters() if n in names})  # fmt: skip
    pairs = lora_pairs(names)
    module = pairs[0].a.split(".lora_A.")[0]
    state = dict(server.global_state)  # a global state with every part non-zero
    g = torch.Generator().manual_seed(5)
    for name, value in state.items():
        state[name] = torch.randn(value.shape, generator=g) * 0.1
    server.global_state = state
    write_state(task.model, state)
    start = _probe(task.model, module)

    clients = [0, 1]
    maps, weights, sizes = [], [], {}
    for c in clients:
        sent = server.train_payload(c, 1)
        (reply,) = grid.exchange([_message(c, sent)])
        a, b = (reply.payload.tensors[pairs[0].a], reply.payload.tensors[pairs[0].b])
        sizes[c] = (a.shape[0], b.shape[1], reply.cost.bytes_up)
        write_state(
            task.model, {**sent.tensors, **task.method.client_start(None, reply.payload.tensors)}
        )
        maps.append(_probe(task.model, module))
        weights.append(float(reply.payload.scalars["num_examples"]))
        if c == 0:  # the client started from the global model: its untouched copy says so
            write_state(
                task.model, {**sent.tensors, **task.method.client_start(None, sent.tensors)}
            )
            torch.testing.assert_close(_probe(task.model, module), start, rtol=0, atol=1e-6)
    assert sizes[0][:2] == (2, 2) and sizes[1][:2] == (4, 4)
    assert sizes[0][2] < sizes[1][2]

    server.run_round(1, grid, clients)
    write_state(task.model, server.global_state)
    wanted = sum(w * m for w, m in zip(weights, maps, strict=True)) / sum(weights)
    torch.testing.assert_close(_probe(task.model, module), wanted, rtol=0, atol=2e-5)
    # and the scale: the module's map is W0 + R + (alpha / r)·B·A with the server's scale
    lora = task.model.get_submodule(module)
    base = lora.base_layer.weight.detach().double()
    g_state = server.global_state
    formula = g_state[pairs[0].residual].double() + product(
        g_state[pairs[0].a], g_state[pairs[0].b], server.scale
    )
    torch.testing.assert_close(_probe(task.model, module), base + formula, rtol=0, atol=2e-5)
    assert server.scale == lora.scaling["default"] == 16.0 / 4


def _message(client: int, payload: Payload):
    from fedft.federation.payload import Message

    return Message(client, "train", payload, 1)


def test_mean_lora_run_is_unchanged_by_the_strategy_code(tmp_path: Path):
    """`mean` with one rank is plain FedAvg: the aggregate equals the weighted mean exactly."""
    from fedft.federation.aggregation import weighted_mean

    server = _server(tmp_path, exact=False, ranks=None, rank=4)
    replies = _replies(server, [0, 1], seed=6)
    aggregate, _ = server.aggregate(replies, 1)
    plain = weighted_mean(
        [{k: r.payload.tensors[k] for k in server.global_state} for r in replies], [10.0, 20.0]
    )
    for name, value in plain.items():
        assert torch.equal(aggregate[name], value), name


def test_pad_keeps_slots_zero_and_products_equal():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, D_IN, generator=g), torch.randn(D_OUT, 2, generator=g)
    pa, pb = pad(a, b, 6)
    assert pa.shape == (6, D_IN) and pb.shape == (D_OUT, 6)
    assert not pa[2:].any() and not pb[:, 2:].any()
    torch.testing.assert_close(product(pa, pb, 2.0), product(a, b, 2.0))


def test_strategies_refuse_what_they_cannot_serve(tmp_path: Path):
    lora = get_method("lora")
    with pytest.raises(ConfigError, match="client_ranks"):
        lora.validate_options({"r": 8, "client_ranks": [4, 16]})
    exact = lora(lora.options_model(aggregation="exact"))
    with pytest.raises(ConfigError, match="outside the mechanism"):
        exact.check_run(tiny_config(tmp_path, **{"privacy.mode": "client", "privacy.epsilon": 8}))
    with pytest.raises(ConfigError, match="server_optimizer=fedavg"):
        exact.check_run(tiny_config(tmp_path, **{"federation.server_optimizer": "fedadam"}))
