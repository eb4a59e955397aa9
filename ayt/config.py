"""Compose the Hydra config, make its paths absolute and validate all of it before any
work (or any Ray actor) starts. Errors are one line: ``field: problem; allowed: ...``."""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from hydra import compose, initialize_config_module
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.hydra import Hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ayt.artifacts import config_hash, file_sha256
from ayt.errors import ConfigError
from ayt.startup import START_MODES

CONFIG_MODULE = "ayt.conf"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def compose_config(overrides: Iterable[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides; Hydra errors become ConfigError,
    the common mistakes in words that say what to type (`check_overrides`, `_unknown_key`)."""
    overrides = list(overrides)
    check_overrides(overrides)
    try:
        return _compose(overrides, config_name)
    except MissingConfigException as err:
        raise _missing_option_error(err) from None
    except (ConfigCompositionException, OverrideParseException, OmegaConfBaseException) as err:
        unknown = re.match(r"Could not override '([^']+)'", str(err))
        if unknown and " not in " in _first_line(err):      # "Key 'los' is not in struct" / "... not in 'TuneStage'"
            raise _unknown_key(unknown.group(1), overrides, config_name) from None
        # The typed study schema (ayt/studies/engine/schema.py) names the key it rejected: say that key.
        key = str(getattr(err.__cause__, "full_key", None) or getattr(err, "full_key", None) or "")
        typed = next((o for o in overrides if key and o.lstrip("+~").partition("=")[0] == key), None)
        if typed and _first_line(err).startswith("Cannot merge"):     # a list where a range is written, ...
            raise ConfigError(key, f"holds another kind of value; replace it in two steps: type `~{key}` "
                              f"`+{typed.lstrip('+~')}`") from None
        raise ConfigError(key if key.startswith("study.") else "overrides", _first_line(err)) from None


def _compose(overrides: list[str], config_name: str) -> DictConfig:
    """Hydra's compose in its own two steps, the first remembered for the life of the process.

    A study composes each trial's config again to plan, record and resume it, and a compose
    reads and merges every yaml anew (about 70 ms). Hydra builds the config from the overrides
    that choose group options (`loss=mfd`, `+study=...`) and then applies the others
    (`batch_size=16`) to it; the first step is remembered per choice of options (the package's
    configs do not change while it runs), the second runs each time with Hydra's own function.
    Overrides Hydra would reject or that can point it elsewhere (a sweep, `hydra.*`) take
    Hydra's whole compose, never remembered. Each caller gets its own copy to change."""
    if any(o.lstrip("+~").startswith("hydra.") for o in overrides):
        return _compose_uncached(tuple(overrides), config_name)
    parsed = [_parse_override(o) for o in overrides]
    if any(o.is_sweep_override() for o in parsed):
        return _compose_uncached(tuple(overrides), config_name)
    values = [o for o in parsed if isinstance(o.value(), dict) or not _is_config_group(o.key_or_group)]
    choices = tuple(o.input_line for o in parsed if o not in values)
    cfg = copy.deepcopy(_compose_remembered(choices, config_name))
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    return cfg


@functools.lru_cache(maxsize=4096)
def _parse_override(override: str) -> Override:
    return OverridesParser.create().parse_overrides([override])[0]


@functools.lru_cache(maxsize=None)
def _is_config_group(key: str) -> bool:
    """Hydra's own test for an override that chooses a group option (hydra/_internal/defaults_list.py)."""
    with _package_hydra() as hydra:
        return hydra.config_loader.repository.group_exists(key)


@functools.lru_cache(maxsize=128)
def _compose_remembered(overrides: tuple[str, ...], config_name: str) -> DictConfig:
    return _compose_uncached(overrides, config_name)


def _compose_uncached(overrides: tuple[str, ...], config_name: str) -> DictConfig:
    with _package_hydra():
        return compose(config_name=config_name, overrides=list(overrides))


@contextlib.contextmanager
def _package_hydra() -> Iterator[Hydra]:
    """Hydra initialised on the package's configs for one use, and cleared after it (whatever
    another caller in this process left initialised is cleared first)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
            yield GlobalHydra.instance().hydra
    finally:
        GlobalHydra.instance().clear()


def check_overrides(overrides: Sequence[str]) -> None:
    """Each command-line item is `key=value` (Hydra's grammar), checked before Hydra reads it:
    a flag (`--out_dir /tmp/x`) and a comma list without brackets (`study.seeds=0,1,2`, which
    Hydra reads as a sweep) get one line with the form to type."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parser = OverridesParser.create()
    for i, item in enumerate(overrides):
        if item.startswith("-"):
            name, eq, value = item.lstrip("-").partition("=")
            after = overrides[i + 1] if i + 1 < len(overrides) else ""
            if not eq and after and "=" not in after and not after.startswith("-"):
                value = after
            raise ConfigError(name or item, f"options are key=value, not flags: type `{name}={value or 'VALUE'}`")
        try:
            parsed = parser.parse_override(item)
        except Exception as err:  # noqa: BLE001 - Hydra's grammar errors: said in one line here
            if "=" not in item:
                line = f"{item}=VALUE" if re.fullmatch(r"[\w.]+", item) else f"KEY={item}"
                raise ConfigError("overrides", f"`{item}` is not key=value: type `{line}` "
                                  "(e.g. out_dir=/tmp/ayt)") from None
            raise ConfigError(item.partition("=")[0].lstrip("+~"), f"cannot read `{item}` ({_first_line(err)}); "
                              "quote a value with spaces or special characters: key='...'") from None
        if parsed.is_sweep_override():
            key, _, value = item.partition("=")
            raise ConfigError(parsed.key_or_group, f"a list needs brackets: type `{key}=[{value}]`")


def _unknown_key(key: str, overrides: list[str], config_name: str) -> ConfigError:
    """`los=mfd`: the nearest known keys (difflib); a new entry of a block that takes any key
    (`study.axes.lr=...`): the line with the `+` that adds it."""
    typed = next((o.lstrip("+") for o in overrides if o.lstrip("+~").partition("=")[0] == key), f"{key}=VALUE")
    from ayt.studies.engine.schema import open_blocks
    block = next((b for b in open_blocks() if key.startswith(b + ".")), None)
    if block is not None:
        what = "axis" if block == "study.axes" else "entry"
        return ConfigError(key, f"a new {what} of {block} needs a leading +: type `+{typed}`")
    known = _known_keys([o for o in overrides if o.lstrip("+~").partition("=")[0] != key], config_name)
    if key in known:              # a block that starts empty ({}): Hydra adds to it only with a +
        return ConfigError(key, f"sets a block that starts empty, which needs a leading +: type `+{typed}`")
    leaf = key.rpartition(".")[2]
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
    near += [k for k in known if k.rpartition(".")[2] == leaf and k not in near]    # huber_c -> loss.huber_c
    if not near:
        return ConfigError(key, "not a config key; the command's --cfg prints every key")
    value, named = typed.partition("=")[2], [f"`{k}`" for k in near[:3]]
    return ConfigError(key, "not a config key; did you mean " + (", ".join(named[:-1]) + " or " if len(named) > 1
                                                                 else "") + f"{named[-1]}? (`{near[0]}={value}`)")


def _known_keys(overrides: list[str], config_name: str) -> list[str]:
    """Every dotted key of the config the other overrides compose (the bare config if they do
    not), blocks included, and every config group's name."""
    cfg = None
    for attempt in (overrides, [o for o in overrides if o.startswith("+study=")], []):
        try:
            cfg = _compose(attempt, config_name)
            break
        except Exception:  # noqa: BLE001 - another bad override: fall back to fewer
            continue
    keys: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            keys.append(prefix + str(k))
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
    if cfg is not None:
        walk(OmegaConf.to_container(cfg, resolve=False), "")
    from importlib.resources import files
    groups = [p.name for p in files(CONFIG_MODULE).iterdir() if p.is_dir() and not p.name.startswith("_")]
    return keys + [g for g in groups if g not in keys]


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause).strip() not in ("", "None"):
        text = str(cause).strip()
    return " ".join(text.split("\n")[0].split())


def _missing_option_error(err: MissingConfigException) -> ConfigError:
    """'loss=foo' with no conf/loss/foo.yaml: name the group and list its options."""
    missing = getattr(err, "missing_cfg_file", None) or ""
    group, _, wrong = missing.rpartition("/")
    options = getattr(err, "options", None) or []
    if group and options:
        return ConfigError(group, f"unknown option {wrong!r}; allowed: " + ", ".join(sorted(options)))
    return ConfigError(group or "overrides", _first_line(err))


# Config fields that hold a file-system path (besides out_dir, cache_dir, ray.storage_path
# and a sqlite tracking.uri), each with what it names: every one is made absolute against the
# directory the command ran in, and a "file" must exist before any work (ayt.preflight).
PATH_FIELDS = {"dataset.root": "directory",          # may be downloaded into (ayt.data)
               "loss.vgg_weights": "file", "loss.lin_weights": "file", "fid.inception_weights": "file",
               "training.init_file": "file", "fid.reference_stats": "file"}


def resolve_paths(cfg: DictConfig, base_dir: str | Path | None = None) -> DictConfig:
    """Make every path absolute against `base_dir` (default: this process's working directory).

    A study resolves its trials' configs against the directory the driver ran in, not the
    trial's own (Ray Tune moves each trial into a directory of its own)."""
    base = Path(base_dir) if base_dir else Path.cwd()
    OmegaConf.set_struct(cfg, False)
    out = _absolute(cfg.out_dir, base)
    cfg.out_dir = out
    cfg.cache_dir = _absolute(cfg.cache_dir, base) if cfg.cache_dir else str(Path(out) / "cache")
    storage = cfg.ray.storage_path
    cfg.ray.storage_path = str(Path(out) / "ray") if not storage else (
        storage if "://" in str(storage) else _absolute(storage, base))
    uri = cfg.tracking.uri
    if not uri:
        cfg.tracking.uri = f"sqlite:///{Path(out) / 'mlflow.db'}"
    elif str(uri).startswith("sqlite:///") and not str(uri).startswith("sqlite:////"):
        cfg.tracking.uri = "sqlite:///" + _absolute(str(uri)[len("sqlite:///"):], base)
    for key in PATH_FIELDS:
        value = OmegaConf.select(cfg, key)
        if value and not OmegaConf.is_missing(cfg, key):
            OmegaConf.update(cfg, key, _absolute(value, base))
    OmegaConf.set_struct(cfg, True)
    return cfg


def _absolute(path: Any, base: Path) -> str:
    return str((base / Path(str(path)).expanduser()).resolve())


# ---- validation ---------------------------------------------------------------------------
# The validators import torch-heavy modules (torch, ayt.data, ayt.method.*, ayt.networks.*)
# when they run, not at import: ayt.config is on every CLI's start-up path (usage, overrides).

def _number(cfg: DictConfig, key: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, integer: bool = False,
            optional: bool = False) -> None:
    """Check that dotted `key` is a (finite) number inside the given bounds."""
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ConfigError(key, f"must be {kind}, got {value!r}")
    lo_bad = low is not None and (value <= low if low_open else value < low)
    hi_bad = high is not None and (value >= high if high_open else value > high)
    if lo_bad or hi_bad:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
        raise ConfigError(key, f"must be {kind} {' and '.join(p for p in (lo, hi) if p)}, got {value!r}")


def _choice(cfg: DictConfig, key: str, allowed: Iterable[str]) -> None:
    value = OmegaConf.select(cfg, key)
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(key, f"unknown value {value!r}; allowed: " + ", ".join(map(str, allowed)))


def _flag(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")


def _validate_device(cfg: DictConfig) -> None:
    from ayt.gpu import cuda_available, require_cuda
    device = str(cfg.device)
    if not DEVICE_PATTERN.match(device):
        raise ConfigError("device", f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    if device.startswith("cuda") and not cuda_available() and not cfg.scaling.use_gpu:
        raise ConfigError("device", f"{device!r} requested but this machine has no CUDA GPU; use device=auto or cpu")
    if cfg.scaling.backend == "local":      # the plain loop trains here: this GPU must work and do the precision
        if cfg.scaling.use_gpu and device == "auto":
            require_cuda(cfg, "cuda", "scaling.use_gpu")
        else:
            require_cuda(cfg, device, "device")


def _validate_training(cfg: DictConfig) -> None:
    for key in ("batch_size", "training.iterations", "training.eval_every", "training.checkpoint_every",
                "training.log_every", "pretrain.iterations", "pretrain.batch_size",
                "feature_map.batch_size", "fid.batch_size", "fid.classifier.batch_size",
                "fid.classifier.iterations", "lr_ref_batch"):
        _number(cfg, key, low=1, integer=True)
    _number(cfg, "feature_map.iterations", low=0, integer=True)
    _number(cfg, "feature_map.p_ramp_iterations", low=0, integer=True)
    _number(cfg, "feature_map.holdout", low=0, high=1, low_open=True, high_open=True)
    if cfg.training.eval_every > cfg.training.iterations:
        raise ConfigError("training.eval_every", f"must be <= training.iterations ({cfg.training.iterations}), "
                          f"got {cfg.training.eval_every}")
    for key in ("lr", "pretrain.lr", "feature_map.lr", "fid.classifier.lr"):
        _number(cfg, key, low=0, low_open=True)
    _choice(cfg, "lr_scaling", ("none", "linear", "sqrt"))
    _number(cfg, "training.ema_decay", low=0, high=1, high_open=True)
    _number(cfg, "training.ema_halflife_kimg", low=0, low_open=True, optional=True)
    _number(cfg, "pretrain.ema_decay", low=0, high=1, high_open=True)
    _choice(cfg, "training.init", START_MODES)
    START_MODES[cfg.training.init].validate(cfg)
    _choice(cfg, "optimizer", ("adam", "radam"))
    stats = cfg.fid.get("reference_stats")
    if stats and cfg.dataset.fid_extractor != "inception":
        raise ConfigError("fid.reference_stats", "precomputed statistics need dataset.fid_extractor=inception, "
                          f"got {cfg.dataset.fid_extractor!r}")
    if stats and not Path(str(stats)).is_file():
        raise ConfigError("fid.reference_stats", f"no such file: {stats}")
    from ayt.precision import PRECISIONS
    _choice(cfg, "precision", PRECISIONS)
    for key in ("cudnn_benchmark", "compile", "channels_last"):
        _flag(cfg, key)
    _number(cfg, "fid.num_samples", low=2, integer=True)
    _number(cfg, "cpu_threads", low=1, integer=True, optional=True)
    _number(cfg, "pretrain.p_std", low=0, low_open=True)
    if len(cfg.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.adam_betas):
        raise ConfigError("adam_betas", f"must be two numbers in [0, 1), got {list(cfg.adam_betas)}")


def _validate_method(cfg: DictConfig) -> None:
    _number(cfg, "edm.sigma_min", low=0, low_open=True)
    _number(cfg, "edm.sigma_max", low=cfg.edm.sigma_min, low_open=True)
    _number(cfg, "edm.sigma_data", low=0, low_open=True)
    _number(cfg, "schedule.q", low=1, low_open=True)
    _number(cfg, "schedule.p_std", low=0, low_open=True)
    _number(cfg, "schedule.p_mean")
    _number(cfg, "schedule.k", low=0)
    _number(cfg, "schedule.b", low=0)
    _number(cfg, "schedule.iterations_per_stage", low=1, integer=True, optional=True)
    _number(cfg, "sampling.t_mid", low=cfg.edm.sigma_min, high=cfg.edm.sigma_max, low_open=True, high_open=True)
    from ayt.method.losses import validate_loss
    loss = validate_loss(cfg.loss)
    _number(cfg, "dataset.augment_rot_max", low=0)     # the augment presets' rot_max (conf/dataset/)
    from ayt.method.augment import validate_augment
    validate_augment(cfg.augment)
    from ayt.networks.feature_map import num_stages_for, validate_feature_map
    validate_feature_map(cfg.feature_map)
    if not loss.needs_feature_map:      # the map (and its power-of-two resolution) is built only for MFD losses
        return
    stages = num_stages_for(int(cfg.dataset.resolution))
    if len(cfg.feature_map.channels) < stages:
        raise ConfigError("feature_map.channels", f"needs at least {stages} entries for dataset.resolution="
                          f"{cfg.dataset.resolution} (one per downsampling stage), got {list(cfg.feature_map.channels)}")


def _validate_network(cfg: DictConfig) -> None:
    net = cfg.network
    _number(cfg, "network.model_channels", low=1, integer=True)
    _number(cfg, "network.num_blocks", low=1, integer=True)
    _number(cfg, "network.dropout", low=0, high=1, high_open=True)
    if not net.channel_mult or any(not isinstance(m, int) or m < 1 for m in net.channel_mult):
        raise ConfigError("network.channel_mult", f"must be a non-empty list of integers >= 1, got {net.channel_mult}")
    _choice(cfg, "network.embedding", ("positional", "fourier"))
    _number(cfg, "dataset.resolution", low=4, integer=True)
    res = int(cfg.dataset.resolution)
    if res % (2 ** (len(net.channel_mult) - 1)):
        raise ConfigError("network.channel_mult", f"{len(net.channel_mult)} levels need a resolution divisible by "
                          f"{2 ** (len(net.channel_mult) - 1)}, got dataset.resolution={res}")


def _validate_scaling(cfg: DictConfig) -> None:
    _choice(cfg, "scaling.backend", ("ray", "local"))
    _number(cfg, "scaling.num_workers", low=1, integer=True)
    if not isinstance(cfg.scaling.use_gpu, bool):
        raise ConfigError("scaling.use_gpu", f"must be true or false, got {cfg.scaling.use_gpu!r}")
    workers = int(cfg.scaling.num_workers)
    if cfg.batch_size % workers:
        raise ConfigError("batch_size", f"global batch {cfg.batch_size} is not divisible by "
                          f"scaling.num_workers={workers}; choose a multiple of {workers}")
    _number(cfg, "scaling.batch_per_worker_max", low=1, integer=True, optional=True)
    _number(cfg, "ray.max_failures", low=-1, integer=True)
    _number(cfg, "ray.worker_start_timeout_s", low=1)
    for res, amount in (cfg.scaling.resources_per_worker or {}).items():
        if not isinstance(amount, (int, float)) or amount < 0:
            raise ConfigError(f"scaling.resources_per_worker.{res}", f"must be a number >= 0, got {amount!r}")


def _validate_tracking(cfg: DictConfig) -> None:
    uri = str(cfg.tracking.uri)
    if not re.match(r"^(sqlite:////|https?://|file:/|databricks|postgresql|mysql)", uri):
        raise ConfigError("tracking.uri", f"unsupported URI {uri!r}; allowed: sqlite:////abs/path.db, http(s)://host:port, "
                          "file:/abs/path, a database URI")
    if not cfg.tracking.experiment:
        raise ConfigError("tracking.experiment", "must be a non-empty name")
    if not isinstance(cfg.tracking.system_metrics, bool):
        raise ConfigError("tracking.system_metrics", f"must be true or false, got {cfg.tracking.system_metrics!r}")
    _number(cfg, "tracking.system_metrics_interval_s", low=0, low_open=True)
    import importlib.util
    if cfg.tracking.system_metrics and importlib.util.find_spec("psutil") is None:
        raise ConfigError("tracking.system_metrics", "true needs psutil for MLflow's CPU and memory metrics "
                          "(pip install psutil), or set tracking.system_metrics=false")


def _validate_data(cfg: DictConfig) -> None:
    from ayt.data import check_dataset_available
    check_dataset_available(cfg.dataset)
    _choice(cfg, "dataset.fid_extractor", ("classifier", "inception"))


def _validate_eval(cfg: DictConfig) -> None:
    """`eval.metrics` names registered metrics whose weights and options are there (ayt/eval/metrics.py)."""
    from ayt.eval.metrics import validate
    validate(cfg)


def _validate_diagnostics(cfg: DictConfig) -> None:
    """Every `diagnostics.<name>` block, by its registered class (ayt/diagnostics.py)."""
    from ayt.diagnostics import validate_diagnostics
    validate_diagnostics(cfg)


VALIDATORS: list[Callable[[DictConfig], None]] = [
    _validate_device, _validate_training, _validate_method, _validate_network, _validate_scaling,
    _validate_tracking, _validate_data, _validate_eval, _validate_diagnostics,
]


def validate_config(cfg: DictConfig) -> DictConfig:
    """Run every check; raise the first ConfigError. Cheap: touches no data beyond file existence."""
    for check in VALIDATORS:
        check(cfg)
    return cfg


def load_config(overrides: Iterable[str] = (), config_name: str = "config",
                base_dir: str | Path | None = None) -> DictConfig:
    """compose -> absolute paths (against `base_dir`, default the working directory) ->
    validate: the config every entry point runs on."""
    return validate_config(resolve_paths(compose_config(overrides, config_name), base_dir))


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a config to dotted keys (for MLflow params)."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# Config keys that say where or how visibly a run happens, not what it computes: left out of
# run names, study identities and cache keys alike.
VOLATILE_KEYS = ("out_dir", "cache_dir", "tracking", "ray", "name", "progress", "verbose", "cpu_threads",
                 "cudnn_benchmark")


def run_name(cfg: DictConfig) -> str:
    """The stable name of a run: `name` if given, else a hash of what defines the run."""
    if cfg.get("name"):
        return str(cfg.name)
    spec = OmegaConf.to_container(cfg, resolve=True)
    for volatile in VOLATILE_KEYS:
        spec.pop(volatile, None)
    if spec["training"].get("init_file") and START_MODES[str(cfg.training.init)].reads_init_file:   # content, not path
        spec["training"]["init_file"] = "sha256:" + file_sha256(spec["training"]["init_file"])
    return f"{cfg.loss.name}-b{cfg.batch_size}-s{cfg.seed}-{config_hash(spec, 8)}"


def print_dry_run(text: str) -> int:
    """Print a dry run's output and return its exit code, 0; a reader that stops early
    (`--cfg | head`) ends it quietly instead of with a BrokenPipeError traceback."""
    try:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at devnull so that flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
