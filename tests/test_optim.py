"""The agent's hand-written SGD step against torch.optim.SGD, and the import it avoids."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from edge_agent.optim import MomentumSGD
from edge_agent.train import train_local
from fedbus.messages import TrainSpec
from fedbus.zoo import build_model

torch.set_num_threads(1)

MLP = {"in_features": 64, "hidden": [32], "num_classes": 10}


def _batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 64, generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(steps)]


def _twin_models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    ours = build_model("mlp", MLP)
    reference = build_model("mlp", MLP)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def _train(model: nn.Module, optimizer: object, batches: list) -> None:
    model.train()
    for x, y in batches:
        optimizer.zero_grad()  # type: ignore[attr-defined]
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("lr", "momentum", "weight_decay"),
    [(0.05, 0.9, 1e-3), (0.1, 0.5, 0.0), (0.02, 0.0, 5e-3), (0.03, 0.0, 0.0)],
)
def test_matches_torch_optim_sgd_over_many_steps(
    lr: float, momentum: float, weight_decay: float
) -> None:
    ours, reference = _twin_models()
    batches = _batches(12)
    _train(ours, MomentumSGD(ours.parameters(), lr=lr, momentum=momentum,
                             weight_decay=weight_decay), batches)
    _train(reference, torch.optim.SGD(reference.parameters(), lr=lr, momentum=momentum,
                                      weight_decay=weight_decay), batches)
    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, theirs[name], rtol=1e-6, atol=1e-7, msg=name)
    # Buffers (the QAT activation ranges) follow the same forward passes.
    for name, buf in reference.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buf, rtol=0, atol=0)


def test_parameter_without_gradient_is_left_alone_and_keeps_its_momentum() -> None:
    ours = [nn.Parameter(torch.tensor([1.0, -2.0])), nn.Parameter(torch.tensor([0.5]))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = MomentumSGD(ours, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt_theirs = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, weight_decay=0.01)
    # the second parameter only gets a gradient from step 3 on: its buffer starts then
    for step in range(5):
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            loss = (params[0] ** 2).sum() * (step + 1)
            if step >= 2:
                loss = loss + (params[1] ** 3).sum()
            loss.backward()
            opt.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_step_keeps_the_raw_gradient_and_leaves_no_graph() -> None:
    param = nn.Parameter(torch.tensor([2.0]))
    (param * 3.0).sum().backward()
    MomentumSGD([param], lr=0.5, momentum=0.9, weight_decay=0.1).step()
    assert param.grad is not None and float(param.grad) == 3.0
    # g = 3 + 0.1 * 2 = 3.2; p = 2 - 0.5 * 3.2
    assert float(param.detach()) == pytest.approx(0.4)
    assert param.requires_grad and param.grad_fn is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr": 0.1, "momentum": -0.1},
     "momentum"), ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay")],
)
def test_bad_hyperparameters_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MomentumSGD([nn.Parameter(torch.zeros(1))], **kwargs)
    with pytest.raises(ValueError, match="empty"):
        MomentumSGD([], lr=0.1)


def test_train_local_matches_torch_optim_sgd() -> None:
    """train_local's loop, replayed with torch.optim.SGD on a twin model, ends identical."""
    rng = np.random.default_rng(1)
    x = rng.random((40, 64), dtype=np.float32)
    y = rng.integers(0, 10, 40)
    spec = TrainSpec(epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3)
    ours, reference = _twin_models(seed=2)
    train_local(ours, x, y, spec, seed=7)

    optimizer = torch.optim.SGD(reference.parameters(), lr=spec.lr, momentum=spec.momentum,
                                weight_decay=spec.weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(7)  # the shuffling train_local does
    batches = [(xt[i], yt[i]) for _ in range(spec.epochs)
               for i in torch.randperm(len(yt), generator=generator).split(spec.batch_size)]
    _train(reference, optimizer, batches)
    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, theirs[name], rtol=1e-6, atol=1e-7, msg=name)


AGENT_PATH = textwrap.dedent("""
    import sys

    import numpy as np
    import torch

    import edge_agent.agent  # noqa: F401 - the modules the agent process loads
    from edge_agent.train import evaluate, train_local, warm_up
    from fedbus.export import export_int8, int8_accuracy
    from fedbus.messages import TrainSpec
    from fedbus.zoo import build_model

    torch.set_num_threads(1)
    warm_up()
    args = {"in_features": 64, "num_classes": 10}
    model = build_model("mlp", args)
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 64), dtype=np.float32), rng.integers(0, 10, 16)
    train_local(model, x, y, TrainSpec(epochs=1, batch_size=8, weight_decay=1e-4), seed=0)
    evaluate(model, x, y)
    int8_accuracy(export_int8(model, arch="mlp", model_args=args), x, y)
    print(sorted(m for m in ("torch._dynamo", "torch._inductor", "sympy") if m in sys.modules))
""")


def test_agent_training_path_does_not_import_torch_dynamo() -> None:
    """torch._dynamo (pulled in by any torch.optim optimizer) costs ~70 MiB on a device."""
    done = subprocess.run([sys.executable, "-c", AGENT_PATH], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
