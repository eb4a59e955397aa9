"""The fine-tuning regime's start (training.init=converged): a consistency model trained on the
run's own setting, built once into the artifact cache, and the weights a fine-tuning run
starts from."""

from __future__ import annotations

import pytest
import torch

from ayt.config import load_config
from ayt.errors import ConfigError

ARGS = ["experiment=smoke", "loss=pseudo_huber", "fid.num_samples=100", "progress=false",
        "converged.iterations=20", "converged.eval_every=10", "converged.batch_size=32"]


def test_converged_start_is_built_once_and_fine_tuning_starts_from_it(shared_out_dir, one_torch_thread):
    from ayt.training.loop import WorkerContext, build_training
    from ayt.training.prepare import artifact_record, ensure_artifacts
    from ayt.data import load_dataset
    cfg = load_config([*ARGS, f"out_dir={shared_out_dir}", "training.init=converged"])
    art = ensure_artifacts(cfg, progress=False)
    start = torch.load(art.pretrained, map_location="cpu", weights_only=True)
    assert art.metrics["converged_images"] == 20 * 32 and art.metrics["converged_fid_1step"] > 0
    built = art.pretrained and __import__("os").stat(art.pretrained).st_mtime_ns
    assert __import__("os").stat(ensure_artifacts(cfg, progress=False).pretrained).st_mtime_ns == built   # cached
    assert "converged_hash" in artifact_record(cfg) and "converged_fid_1step" in artifact_record(cfg)

    pretrained = ensure_artifacts(load_config([*ARGS, f"out_dir={shared_out_dir}"]), progress=False).pretrained
    denoiser = torch.load(pretrained, map_location="cpu", weights_only=True)
    assert any(not torch.equal(start[k], denoiser[k]) for k in start)   # 20 consistency steps changed it
    step = build_training(cfg, art, WorkerContext(torch.device("cpu")), load_dataset(cfg.dataset, train=True))
    for key, value in step.ema.model.state_dict().items():
        assert torch.equal(value, start[key]), key

    longer = load_config([*ARGS, f"out_dir={shared_out_dir}", "training.init=converged", "converged.iterations=40"])
    assert artifact_record(longer)["converged_hash"] != artifact_record(cfg)["converged_hash"]


@pytest.mark.parametrize("override, field", [
    ("converged.loss=mfd", "converged.loss"),
    ("converged.iterations=0", "converged.iterations"),
    ("converged.eval_every=50", "converged.eval_every"),
])
def test_bad_converged_settings_name_their_field(tmp_path, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config([*ARGS, f"out_dir={tmp_path}", "training.init=converged", override])
    load_config([*ARGS, f"out_dir={tmp_path}", override])      # read only with training.init=converged
