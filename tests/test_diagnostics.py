"""The diagnostics registry (`ayt.diagnostics`): a diagnostic is one registered class
plus its config block, and the config checks, the step and the checkpoint reach it by name
only. A toy diagnostic stands in for a new one.

Every test names in its docstring the change to the product code that it catches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ayt.config import compose_config, load_config
from ayt.errors import ConfigError
from ayt.metrics import EVAL
from ayt.diagnostics import (DIAGNOSTICS, Diagnostic, Diagnostics, build_diagnostics, register_diagnostic,
                                      registry, validate_diagnostics)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


class Toy(Diagnostic):
    """Counts what the run calls: steps, the micro-batch backwards it sees, evaluations."""

    observes_gradients = True

    def __init__(self, micro_batches: int):
        self.micro_batches, self.steps, self.backwards, self.evaluations = micro_batches, 0, 0, 0

    @classmethod
    def validate(cls, cfg, key):
        if OmegaConf.select(cfg, f"{key}.micro_batches") < 1:
            raise ConfigError(f"{key}.micro_batches", "must be >= 1")

    @classmethod
    def create(cls, cfg, spec, data, device):
        return cls(int(spec.micro_batches))

    def tags(self):
        return {"ayt.toy": "on"}

    def after_backward(self, keep):
        self.backwards += 1

    def end_step(self, b_small, b_big):
        self.steps += 1

    def evaluate(self, step, iteration, reduce):
        self.evaluations += 1
        return {EVAL + "toy": float(reduce(torch.tensor(float(self.evaluations))))}

    def state_dict(self):
        return {"evaluations": self.evaluations}

    def load_state_dict(self, state):
        self.evaluations = int(state["evaluations"])


@pytest.fixture
def toy(monkeypatch):
    registry()
    monkeypatch.setitem(DIAGNOSTICS, "toy", Toy)
    return register_diagnostic("toy")(Toy)


def _cfg(*overrides):
    return compose_config(["experiment=smoke", "loss=pseudo_huber", "training.init=scratch", "batch_size=8",
                           "+diagnostics.toy.enabled=true", "+diagnostics.toy.micro_batches=4", *overrides])


def test_an_unknown_diagnostic_is_one_line_naming_it_and_the_allowed_names(tmp_path):
    """Mutation caught: blocks under `diagnostics` read only by the names the code knows (a
    typo'd block silently measuring nothing)."""
    with pytest.raises(ConfigError) as info:
        load_config(["experiment=smoke", f"out_dir={tmp_path}", "+diagnostics.tangnet.enabled=true"])
    assert info.value.field == "diagnostics.tangnet"
    assert "allowed: noise_scale, tangent" in str(info.value) and "\n" not in str(info.value)


def test_a_new_diagnostic_is_one_class_and_its_block(toy):
    """The toy, registered and configured and nothing else, is validated, built, hooked into
    the step (its micro-batch split included), evaluated and tagged. Mutations caught: the step
    or `build_training` calling a named diagnostic instead of the hooks, `enabled` unchecked."""
    from ayt.training.loop import WorkerContext, build_training
    from ayt.training.prepare import Artifacts
    validate_diagnostics(_cfg())
    with pytest.raises(ConfigError, match="diagnostics.toy.micro_batches"):
        validate_diagnostics(_cfg("diagnostics.toy.micro_batches=0"))
    with pytest.raises(ConfigError, match="diagnostics.toy.enabled"):
        validate_diagnostics(_cfg("diagnostics.toy.enabled=maybe"))
    cfg = _cfg("diagnostics.tangent.enabled=false")
    data = SimpleNamespace(resolution=16, channels=1)
    step = build_training(cfg, Artifacts(), WorkerContext(CPU), data)          # on its own, as the benchmarks do
    (hook,) = step.hooks
    assert step.chunks == 4
    step(torch.rand(8, 1, 16, 16) * 2 - 1, 0)
    assert (hook.steps, hook.backwards) == (1, 4)
    diagnostics = build_diagnostics(cfg, 0, data, CPU)
    assert diagnostics.evaluate(step, 1, lambda t: t) == {EVAL + "toy": 1.0}
    assert diagnostics.tags() == {"ayt.toy": "on"}
    assert len(build_diagnostics(_cfg("diagnostics.toy.enabled=false", "diagnostics.tangent.enabled=false"),
                                 0, data, CPU)) == 0


def test_checkpoint_states_by_name_and_the_layout_before_the_registry(toy, tmp_path):
    """Each rank's states round-trip as `{name: state}`; a checkpoint written before the
    registry (rank 0's states inside state.pt, a rank's own in `<name>_rank<r>.pt`) still
    loads. Mutations caught: a state saved or restored for one named diagnostic only, the
    old layout no longer read."""
    saved = Toy(2)
    saved.evaluations = 7
    Diagnostics([saved]).save(tmp_path, rank=1)
    resumed = Toy(2)
    Diagnostics([resumed]).load(tmp_path, 1, CPU, blob={})
    assert resumed.evaluations == 7
    fresh = Toy(2)
    Diagnostics([fresh]).load(tmp_path, 0, CPU, blob={})           # rank 0 saved nothing: starts afresh
    assert fresh.evaluations == 0

    old = tmp_path / "old"
    old.mkdir()
    torch.save({"evaluations": 3}, old / "toy_rank0.pt")
    from_file, from_blob = Toy(2), Toy(2)
    Diagnostics([from_file]).load(old, 0, CPU, blob={})
    Diagnostics([from_blob]).load(old, 1, CPU, blob={"toy": {"evaluations": 5}, "net": {}})
    assert (from_file.evaluations, from_blob.evaluations) == (3, 5)
