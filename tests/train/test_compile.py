"""`train.compile` and `train.channels_last` (pipeline.train.compile): the networks' custom ops trace into one graph
each, compiled training computes what eager training does, regularization phases stay eager, and the modules
stay the same modules (state dicts, checkpoints, G_ema)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from pipeline.config import load_config
from pipeline.objectives import Networks, Phase, PhaseInputs
from pipeline.train import load_checkpoint, train
from pipeline.train.compile import phase_context
from pipeline.train.task import GANTask
from tests.conftest import REPO

COMPARED = ("Loss/G/loss", "Loss/D/loss", "Loss/scores/fake", "Loss/scores/real", "Loss/r1_penalty",
            "Loss/pl_penalty")  # fmt: skip


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module` was compiled in place (`nn.Module.compile` sets this attribute)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def _rows(run_dir: str) -> list[dict[str, str]]:
    with open(f"{run_dir}/logs/metrics.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("recipe", ["stylegan2", "stylegan3"])
def test_networks_trace_without_graph_breaks(recipe: str, monkeypatch) -> None:
    """Every compiled unit, through the fused ops' custom ops (impl=triton: their fake implementations trace, the
    Triton interpreter runs them), is one graph: no graph break anywhere."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("GANPIPE_OPS_IMPL", "triton")
    overrides = ["data.resolution=16", "model.z_dim=8", "model.w_dim=8", "model.mapping.num_layers=1"]
    if recipe == "stylegan2":
        overrides += ["model.synthesis.channel_base=64", "model.synthesis.channel_max=8",
                      "model.discriminator.channel_base=64", "model.discriminator.channel_max=8"]  # fmt: skip
    else:
        overrides += ["model.synthesis.channel_base=128", "model.synthesis.channel_max=8",
                      "model.synthesis.num_layers=4", "model.discriminator.channel_base=64",
                      "model.discriminator.channel_max=8"]  # fmt: skip
    cfg = load_config(str(REPO / "recipes" / recipe / "tiny.yaml"), overrides)
    task = GANTask(cfg)
    G, D = task.G, task.D
    z = torch.randn(2, G.z_dim)
    units = task.objective.compile_units(task.networks())
    assert units == [G.mapping, G.synthesis, D]
    ws = G.mapping(z, None)
    img = G.synthesis(ws)
    for name, fn, args in (("mapping", G.mapping, (z, None)), ("synthesis", G.synthesis, (ws,)), ("D", D, (img, None))):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*args)
        reasons = [str(b.reason) for b in explained.break_reasons]
        assert explained.graph_break_count == 0 and explained.graph_count == 1, (name, reasons)
        ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
        assert any("ganpipe" in op for op in ops), (name, "traced no fused op", sorted(ops)[:20])


def test_compiled_training_matches_eager(make_config, one_torch_thread) -> None:
    """Six steps with every phase due every second step (path length, R1): the logged losses of a compiled run equal
    the eager run's. Inductor draws StyleGAN's noise from its own generator unless `fallback_random` is set, so
    the test sets it (training need not; without it the noise differs and the losses here differ by up to 150%).
    Tolerance 1e-5 relative + 1e-6 absolute: Inductor fuses and reorders float32 sums, and six Adam steps carry
    that into the weights; measured at most 6.9e-7 relative."""
    import torch._inductor.config as inductor_config

    common = ("train.total_kimg=0.048", "loss.pl_weight=2", "loss.g_reg_interval=2", "loss.d_reg_interval=2",
              "loss.style_mixing_prob=0.5", "logger.csv=true", "train.log_every_kimg=0.008")  # fmt: skip
    eager = make_config(*common)
    compiled = make_config(*common, "train.compile=true", f"run_dir={eager.run_dir}-compiled")
    torch._dynamo.reset()
    # Inductor's config patch, not monkeypatch: undoing a monkeypatch there deletes the option for later tests.
    with inductor_config.patch(fallback_random=True):
        train(eager)
        result = train(compiled)
    rows_e, rows_c = _rows(eager.run_dir), _rows(compiled.run_dir)
    assert len(rows_e) == len(rows_c) == 6
    compared = 0
    for step, (re_, rc) in enumerate(zip(rows_e, rows_c, strict=True)):
        for name in COMPARED:
            assert bool(re_.get(name)) == bool(rc.get(name)), (step, name)
            if re_.get(name):
                e, c = float(re_[name]), float(rc[name])
                assert math.isfinite(c) and c == pytest.approx(e, rel=1e-5, abs=1e-6), (step, name, e, c)
                compared += 1
    assert compared >= 24
    # The checkpoint holds plain parameter names (compiled in place: no `_orig_mod.` prefix).
    state = load_checkpoint(result.checkpoint)
    assert not any("_orig_mod" in k for net in ("G", "D", "G_ema") for k in state[net])


def test_regularization_phases_run_eagerly(make_config) -> None:
    """Under `train.compile` the compiled units are G's mapping and synthesis and D, never G_ema. A phase that
    differentiates a gradient (R1, path length) calls them eagerly, so it gets the eager task's gradients; without
    the eager context the compiled graphs cannot give R1's gradient at all."""
    compiled = GANTask(make_config("train.compile=true", "loss.pl_weight=2"))
    eager = GANTask(make_config("loss.pl_weight=2"))
    eager.load_state_dict(compiled.state_dict())
    assert [is_compiled(m) for m in (compiled.G.mapping, compiled.G.synthesis, compiled.D)] == [True, True, True]
    assert not any(is_compiled(m) for m in (*eager.modules(), *compiled.G_ema.modules()))
    phases = {p.name: p for p in compiled.phases}
    assert phases["Dreg"].double_backward and phases["Greg"].double_backward
    assert not phases["Gmain"].double_backward and not phases["Dmain"].double_backward
    res = compiled.cfg.data.resolution
    inputs = PhaseInputs(torch.rand(4, 3, res, res) * 2 - 1, None, torch.randn(4, compiled.z_dim), None)
    grads = []
    for task in (compiled, eager):
        task._train_only(("D",))
        torch._dynamo.reset()
        with phase_context(phases["Dreg"]):
            loss, stats = task.objective.phase_loss(phases["Dreg"], task.networks(), inputs)
            loss.backward()
        assert float(stats["Loss/r1_penalty"]) > 0
        grads.append([p.grad for p in task.D.parameters()])
    for a, b in zip(*grads, strict=True):
        assert a is not None and torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="double backward"):
        loss, _ = compiled.objective.phase_loss(phases["Dreg"], compiled.networks(), inputs)
        loss.backward()


def test_channels_last_keeps_results_and_state_dicts(make_config) -> None:
    """channels_last changes the memory order of G's and D's 4-D weights, not their values or what they compute."""
    plain, nhwc = GANTask(make_config()), GANTask(make_config("train.channels_last=true"))
    convs = [p for p in nhwc.D.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(p.is_contiguous() for p in nhwc.G_ema.parameters())  # G_ema (export) stays contiguous
    nhwc.load_state_dict(plain.state_dict())  # copies values into the existing (channels_last) parameters
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in nhwc.D.parameters() if p.ndim == 4)
    img = torch.rand(2, 3, 16, 16)
    assert torch.allclose(plain.D(img, None), nhwc.D(img, None), atol=1e-5)


def test_compile_units_default_to_every_trained_network() -> None:
    """An objective that does not name its compile units gets G, D and the family's further trained networks."""
    from pipeline.objectives.base import Objective

    class Plain(Objective):
        def phases(self) -> list[Phase]:
            return []

        def phase_loss(self, phase: Phase, nets: Networks, inputs: PhaseInputs) -> tuple[torch.Tensor, dict]:
            raise AssertionError("never called")

    G, D, Q = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    assert Plain().compile_units(Networks(G, D, {"Q": Q})) == [G, D, Q]


def test_channels_last_biggan_with_attention(tmp_path) -> None:
    """channels_last through BigGAN's spectral norm (which flattens NHWC weights: a `.view` there fails) and
    self-attention."""
    overrides = ["model.ch=4", "model.d_ch=4", "model.g_attention=[16]", "model.d_attention=[16]",
                 f"run_dir={tmp_path}/run", "train.channels_last=true"]  # fmt: skip
    task = GANTask(load_config(str(REPO / "recipes" / "biggan" / "tiny.yaml"), overrides))
    c = torch.arange(4) % task.cfg.model.c_dim
    img = task.G(torch.randn(4, task.z_dim), c)
    assert img.is_contiguous(memory_format=torch.channels_last)
    task.D(img, c).sum().backward()
    assert all(p.grad is not None for p in task.G.parameters() if p.requires_grad and p.ndim == 4)
