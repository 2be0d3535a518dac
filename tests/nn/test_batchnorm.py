"""CrossReplicaBatchNorm on two gloo ranks, each with half of a batch, against torch's BatchNorm2d on the whole
batch: outputs, running statistics, parameter gradients (averaged over ranks, as the gradient sync does), input
gradients, and a gradient of a gradient (R1 through a network with BatchNorm)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.nn import CrossReplicaBatchNorm, convert_batchnorm

C = 3


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, C, 5, 5, generator=gen) * 3 + 1
    w = torch.randn(8, C, 5, 5, generator=gen)  # weights of the loss, so the gradient is not trivial
    return x, w


def _run(bn: nn.Module, x: torch.Tensor, w: torch.Tensor, penalty_weight: float) -> dict[str, torch.Tensor]:
    """Output, input gradient of the loss, running statistics, and the parameter gradients of loss + an R1-like
    penalty on that input gradient (so the gradient of a gradient runs through the layer)."""
    x = x.clone().requires_grad_(True)
    y = bn(x)
    loss = (y * w).square().mean()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    g_weight, g_bias = torch.autograd.grad(loss + penalty_weight * gx.square().sum(), [bn.weight, bn.bias])
    return {"y": y.detach(), "gx": gx.detach(), "g_weight": g_weight, "g_bias": g_bias,
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()}  # fmt: skip


def _seeded_bn(cls: type[nn.Module]) -> nn.Module:
    bn = cls(C)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, w = _inputs()
        half = slice(rank * 4, (rank + 1) * 4)
        result = _run(_seeded_bn(CrossReplicaBatchNorm), x[half], w[half], penalty_weight=1.0)
        for name in ("g_weight", "g_bias"):  # what the gradient-sync strategy does: the mean over ranks
            dist.all_reduce(result[name])
            result[name] /= 2
        torch.save(result, f"{out}-{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_batchnorm_on_the_whole_batch(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}-{r}.pt", weights_only=True) for r in range(2)]
    x, w = _inputs()
    # A rank's loss L_r is a mean over its half batch, so L_0 + L_1 = 2 L (L: the whole batch's mean loss), and a
    # rank's input gradient (the shared statistics carry every rank's loss back) is 2 dL/dx. Its penalty, summed
    # over ranks, is 4 |dL/dx|^2; the ranks' mean parameter gradient is therefore that of L + 2 |dL/dx|^2.
    ref = _run(_seeded_bn(nn.BatchNorm2d), x, w, penalty_weight=2.0)
    torch.testing.assert_close(torch.cat([ranks[0]["y"], ranks[1]["y"]]), ref["y"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([ranks[0]["gx"], ranks[1]["gx"]]) / 2, ref["gx"], rtol=1e-4, atol=1e-6)
    for r in ranks:
        for name in ("running_mean", "running_var", "g_weight", "g_bias"):
            torch.testing.assert_close(r[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_single_process_and_eval_are_plain_batchnorm_and_conversion_round_trips() -> None:
    x, _ = _inputs()
    ours, ref = _seeded_bn(CrossReplicaBatchNorm), _seeded_bn(nn.BatchNorm2d)
    torch.testing.assert_close(ours(x), ref(x))
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    net = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C))
    weight = net[1].weight
    converted = convert_batchnorm(net)
    assert isinstance(converted[1], CrossReplicaBatchNorm) and converted[1].weight is weight
    back = convert_batchnorm(converted, to_cross_replica=False)
    assert not isinstance(back[1], CrossReplicaBatchNorm) and back[1].weight is weight
    assert list(back.state_dict()) == list(nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C)).state_dict())
