"""Bad configs fail before any work starts: one line naming the field, exit code != 0,
nothing logged."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from ayt.config import compose_config, load_config, resolve_paths, validate_config
from ayt.errors import ConfigError


@pytest.mark.parametrize("overrides, field, words", [
    (["loss.name=foo"], "loss.name", "allowed: l1, l2, lpips, mfd, mixed, pseudo_huber"),
    (["loss=foo"], "loss", "allowed:"),
    (["batch_size=0"], "batch_size", ">= 1"),
    (["loss=pseudo_huber", "loss.huber_c=-0.1"], "loss.huber_c", ">= 0"),
    (["augment.rot_max=-1"], "augment.rot_max", ">= 0"),
    (["augment.scale_std=-0.5"], "augment.scale_std", ">= 0"),
    (["augment.p=1.5"], "augment.p", "[0, 1]"),
    (["augment.p=-0.1"], "augment.p", "[0, 1]"),
    (["training.eval_every=5000", "training.iterations=100"], "training.eval_every", "<= training.iterations"),
    (["dataset=cifar10", "dataset.root=/nonexistent/cifar"], "dataset.root", "not found"),
    (["loss=lpips"], "loss.vgg_weights", "file not found"),
    (["loss=mixed", "loss.pixel=l3"], "loss.pixel", "allowed: pseudo_huber, l2, l1"),
    (["lr_scaling=cubic"], "lr_scaling", "allowed: none, linear, sqrt"),
    (["precision=fp8"], "precision", "allowed: fp32, tf32, bf16"),
    (["cudnn_benchmark=sometimes"], "cudnn_benchmark", "true or false"),
    (["compile=1"], "compile", "true or false"),
    (["device=tpu"], "device", "allowed"),
    (["scaling.num_workers=0"], "scaling.num_workers", ">= 1"),
    (["scaling.num_workers=3", "batch_size=32"], "batch_size", "not divisible"),
    (["training.ema_decay=1.5"], "training.ema_decay", "< 1"),
    (["schedule.q=1"], "schedule.q", "> 1"),
    (["tracking.uri=ftp://x"], "tracking.uri", "allowed"),
    (["no_such_key=1"], "no_such_key", "not a config key"),
])
def test_bad_config_names_the_field(tmp_path, overrides, field, words):
    with pytest.raises(ConfigError) as info:
        load_config(overrides + [f"out_dir={tmp_path}"])
    assert info.value.field == field
    message = str(info.value)
    assert message.startswith(f"{field}: ") and words in message and "\n" not in message


def test_default_config_is_valid_and_paths_are_absolute(tmp_path):
    cfg = load_config([f"out_dir={tmp_path / 'o'}"])
    assert cfg.out_dir == str(tmp_path / "o")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'o' / 'mlflow.db'}"
    assert cfg.cache_dir == str(tmp_path / "o" / "cache")
    assert cfg.loss.name == "mfd" and cfg.schedule.q == 256 and cfg.dataset.name == "digits"


def test_presets_compose(tmp_path):
    for overrides in (["schedule=ect"], ["experiment=smoke"], ["network=cifar10", "dataset=digits"],
                      ["loss=mixed"], ["augment=idt"], ["augment=geo_deg"]):
        validate_config(resolve_paths(compose_config(overrides + [f"out_dir={tmp_path}"])))
    assert compose_config(["schedule=ect"]).schedule.iterations_per_stage == 25000


def test_cli_bad_config_exits_nonzero_with_one_line_and_logs_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ayt.train", "batch_size=0", f"out_dir={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("ayt:")]
    assert lines == ["ayt: config error: batch_size: must be an integer >= 1, got 0"]
    assert not (out / "mlflow.db").exists() and not (out / "cache").exists()


def test_cli_dry_run_prints_resolved_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ayt.train", "--cfg", "loss=l2", f"out_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "name: l2" in proc.stdout and str(tmp_path) in proc.stdout


@pytest.mark.parametrize("overrides", [
    [],
    ["experiment=smoke", "loss=pseudo_huber", "loss.huber_c=0.03", "batch_size=16", "seed=3"],
    ["+study=batch_size_sweep", "study.seeds=[0,1]", "study.metric=fid_mfd", "name=s-1"],
    ["loss={name: l2}"],                                       # a dict value for a group: a value override
    ["~fid.inception_weights", "++extra.note=x", "+added=1"],   # delete, force-add, add
    ["augment=idt", "feature_map=small", "feature_map.iterations=7"],
    ["los=mfd"], ["loss=foo"], ["batch_size=[1"], ["+batch_size=3"], ["~no_such_key"],   # Hydra's errors
])
def test_the_remembered_compose_gives_what_hydra_composes(overrides):
    """`_compose` builds from the group choices (remembered), then applies the value overrides
    with Hydra's own function: the result, its flags and its errors are those of one compose."""
    from ayt import config

    def outcome(compose):
        try:
            cfg = compose()
        except Exception as err:                                 # noqa: BLE001: the error is the outcome
            return type(err).__name__, str(err), type(err.__cause__).__name__
        return OmegaConf.to_yaml(cfg), OmegaConf.is_struct(cfg)

    for _ in range(2):                                          # the second: from what is remembered
        assert outcome(lambda: config._compose(list(overrides), "config")) == \
            outcome(lambda: config._compose_uncached(tuple(overrides), "config"))
    first = config._compose(list(overrides), "config") if overrides[:1] == ["experiment=smoke"] else None
    if first is not None:                                       # each caller changes its own copy
        first.lr, first.loss.huber_c = 999.0, 999.0
        assert config._compose(list(overrides), "config") == config._compose_uncached(tuple(overrides), "config")
