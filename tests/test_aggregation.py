from pathlib import Path

import torch

from fedft.config import FederationConfig
from fedft.federation.aggregation import ServerOptimizer, weighted_mean
from fedft.federation.client import ClientRuntime
from fedft.federation.engine import build_task
from fedft.federation.grid import LocalGrid
from fedft.federation.payload import Message, Payload
from fedft.federation.server import FedAvgServer
from fedft.federation.training import read_state

from helpers import tiny_config


def test_weighted_mean_matches_hand_computation():
    a = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([[0.5]])}
    b = {"w": torch.tensor([3.0, 0.0, -1.0]), "b": torch.tensor([[1.5]])}
    c = {"w": torch.tensor([0.0, 4.0, 1.0]), "b": torch.tensor([[-2.0]])}
    out = weighted_mean([a, b, c], [10, 30, 60])
    assert torch.allclose(
        out["w"],
        torch.tensor([(10 * 1 + 30 * 3 + 0) / 100, (20 + 0 + 240) / 100, (30 - 30 + 60) / 100]),
    )
    assert torch.allclose(out["b"], torch.tensor([[(5 + 45 - 120) / 100]]))
    assert out["w"].dtype == torch.float32


def test_fedavg_round_is_the_sample_weighted_mean_of_client_replies(tmp_path: Path):
    cfg = tiny_config(
        tmp_path, "bias", **{"data.partition": "dirichlet", "data.min_partition_size": 5}
    )
    task = build_task(cfg)
    names = task.method.trainable_names
    start = read_state(task.model, names)
    grid = LocalGrid(
        ClientRuntime(task.method, task.model, task.data, cfg, task.device), task.device
    )
    clients = [0, 1, 2]
    # What each client sends, asked for one by one:
    replies = grid.exchange([Message(c, "train", Payload(dict(start)), 1) for c in clients])
    sizes = [len(task.data.clients[c].train) for c in clients]
    assert [r.payload.scalars["num_examples"] for r in replies] == sizes
    by_hand = {
        n: sum(r.payload.tensors[n].double() * s for r, s in zip(replies, sizes, strict=True))
        / sum(sizes)
        for n in names
    }
    server = FedAvgServer(cfg, start)
    server.run_round(1, grid, clients)
    for n in names:
        torch.testing.assert_close(server.global_state[n], by_hand[n].float(), rtol=0, atol=1e-6)


def test_fedadam_moves_towards_the_mean_and_keeps_state():
    cfg = FederationConfig(server_optimizer="fedadam", server_lr=0.1)
    opt = ServerOptimizer(cfg)
    current = {"w": torch.zeros(3)}
    new = opt.step(current, {"w": torch.tensor([1.0, -1.0, 0.0])})
    assert new["w"][0] > 0 and new["w"][1] < 0 and new["w"][2] == 0
    assert set(opt.state) == {"m.w", "v.w"}
