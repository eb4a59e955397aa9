"""`compile=true` keeps the step's meaning (CPU Inductor, a tiny U-Net with dropout 0.5): the
target and the prediction of a train-mode pair share their dropout mask through the RNG
replay (`ayt.training.step.dropout_replay`), so x_t = x_r and t = r give prediction ==
target exactly, and a compiled step computes the eager step's loss and update.

Mutations caught: build_training compiling without `fallback_random` (Inductor's own random
kernels draw other masks than eager mode: the compiled and eager losses differ, the
second test fails); consistency_terms without the replay (the two compiled passes draw
different masks: the first test fails, as its control shows).

One module-scoped pair of steps: Inductor compiles the tiny network's graphs once (about a
minute on 2 cores) and both tests reuse them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ayt.config import compose_config
from ayt.method.schedule import ConsistencyPair
from ayt.precision import preserved_backend_flags
from ayt.training.loop import WorkerContext, build_training
from ayt.training.prepare import Artifacts, configure_torch
from ayt.training.step import consistency_terms

TINY = ["network=cpu", "dataset=digits", "network.model_channels=8", "network.channel_mult=[1]",
        "network.num_blocks=1", "network.attn_resolutions=[]", "network.dropout=0.5", "loss=pseudo_huber",
        "training.init=scratch", "batch_size=4", "device=cpu", "diagnostics.tangent.enabled=false"]


def _step(compiled: bool):
    cfg = compose_config([*TINY, f"compile={str(compiled).lower()}"])
    configure_torch(cfg)
    torch.manual_seed(0)            # both steps start from the same weights
    return build_training(cfg, Artifacts(), WorkerContext(torch.device("cpu")),
                          SimpleNamespace(resolution=8, channels=1))


@pytest.fixture(scope="module")
def steps():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with preserved_backend_flags(), torch.random.fork_rng(devices=[]):
        yield _step(False), _step(True)
    torch.set_num_threads(before)


def test_compiled_pair_with_equal_inputs_predicts_its_target_exactly(steps):
    _, compiled = steps
    assert hasattr(compiled.net, "_orig_mod")          # the step really calls the compiled module
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    t = torch.full((4,), 0.7)
    pair = ConsistencyPair(x=x, t=t, r=t.clone(), x_t=x, x_r=x)
    terms = consistency_terms(compiled.net, compiled.loss, pair, 0, 0.002, compiled.autocast(x.device))
    assert torch.equal(terms["loss"], torch.zeros(4))
    # Control: without the replay the compiled network draws another mask (dropout is on).
    with torch.no_grad():
        assert not torch.equal(compiled.net(x, t), compiled.net(x, t))


def test_compiled_step_gives_the_eager_loss_and_update(steps):
    eager, compiled = steps
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for iteration in range(2):
        torch.manual_seed(10 + iteration)
        loss_eager = eager(x, iteration)["loss"]
        torch.manual_seed(10 + iteration)        # the same dropout stream for both
        loss_compiled = compiled(x, iteration)["loss"]
        assert loss_eager > 0
        torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-4, atol=1e-6)
    for p_eager, p_compiled in zip(eager.ema.model.parameters(), compiled.ema.model.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, rtol=1e-4, atol=1e-5)
