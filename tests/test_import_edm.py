"""`python -m ayt.tools.import_edm`, `training.init=file` and the `cifar10_paper` preset.

No real EDM file is needed: `edm_songunet_shapes` emits the state-dict keys and shapes of
NVlabs/edm's `SongUNet` (DDPM++ configuration: standard encoder/decoder, positional noise
embedding, [1, 1] resampling, one attention head, `augment_dim=9` as in the CIFAR-10 pickles),
written here from the facts of edm's `training/networks.py` (module names `enc.32x32_conv`,
`enc.16x16_down`, `dec.8x8_in0`, `dec.32x32_aux_conv`, ...; `resample_filter` buffers on
resampling convolutions; Linear/Conv weights [out, in(, k, k)]). `songunet_reference` is an
independent functional forward pass of that network from those tensors, so a mapping that
permutes the wrong rows or feeds the embedding halves in the wrong order is caught even though
it would survive a round trip.
"""

from __future__ import annotations

import importlib
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ayt.config import compose_config, load_config, run_name
from ayt.errors import ConfigError
from ayt.networks.precond import build_denoiser
from ayt.tools import import_edm as imp

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(img_resolution=16, in_channels=3, model_channels=16, channel_mult=(1, 2, 2), num_blocks=2,
             attn_resolutions=(8,))
CIFAR10 = dict(img_resolution=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
               attn_resolutions=(16,))


# ---- EDM's SongUNet, from the published facts --------------------------------------------


def songunet_modules(img_resolution, in_channels, model_channels, channel_mult, num_blocks, attn_resolutions):
    """[(name, kind, cin, cout, flags)] in EDM's module order (kind: conv | block | norm)."""
    mods = [("enc.{0}x{0}_conv".format(img_resolution), "conv", in_channels, model_channels, {})]
    cout, skips = model_channels, [model_channels]
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level:
            mods.append((f"enc.{res}x{res}_down", "block", cout, cout, {"down": True}))
            skips.append(cout)
        for idx in range(num_blocks):
            mods.append((f"enc.{res}x{res}_block{idx}", "block", cout, model_channels * mult,
                         {"attn": res in attn_resolutions}))
            cout = model_channels * mult
            skips.append(cout)
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            mods.append((f"dec.{res}x{res}_in0", "block", cout, cout, {"attn": True}))
            mods.append((f"dec.{res}x{res}_in1", "block", cout, cout, {}))
        else:
            mods.append((f"dec.{res}x{res}_up", "block", cout, cout, {"up": True}))
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            mods.append((f"dec.{res}x{res}_block{idx}", "block", cin, cout,
                         {"attn": idx == num_blocks and res in attn_resolutions}))
    mods.append((f"dec.{img_resolution}x{img_resolution}_aux_norm", "norm", cout, cout, {}))
    mods.append((f"dec.{img_resolution}x{img_resolution}_aux_conv", "conv", cout, in_channels, {}))
    return mods


def edm_songunet_shapes(augment_dim=9, **arch):
    """EDM SongUNet state-dict key -> shape (DDPM++, unconditional)."""
    mc = arch["model_channels"]
    emb = 4 * mc
    shapes = {}
    if augment_dim:
        shapes["map_augment.weight"] = (mc, augment_dim)
    shapes.update({"map_layer0.weight": (emb, mc), "map_layer0.bias": (emb,),
                   "map_layer1.weight": (emb, emb), "map_layer1.bias": (emb,)})
    for name, kind, cin, cout, flags in songunet_modules(**arch):
        if kind == "conv":
            shapes.update({f"{name}.weight": (cout, cin, 3, 3), f"{name}.bias": (cout,)})
        elif kind == "norm":
            shapes.update({f"{name}.weight": (cout,), f"{name}.bias": (cout,)})
        else:
            resample = flags.get("up") or flags.get("down")
            shapes.update({f"{name}.norm0.weight": (cin,), f"{name}.norm0.bias": (cin,),
                           f"{name}.conv0.weight": (cout, cin, 3, 3), f"{name}.conv0.bias": (cout,)})
            if resample:
                shapes[f"{name}.conv0.resample_filter"] = (1, 1, 2, 2)
            shapes.update({f"{name}.affine.weight": (cout, emb), f"{name}.affine.bias": (cout,),
                           f"{name}.norm1.weight": (cout,), f"{name}.norm1.bias": (cout,),
                           f"{name}.conv1.weight": (cout, cout, 3, 3), f"{name}.conv1.bias": (cout,)})
            if cin != cout or resample:
                shapes.update({f"{name}.skip.weight": (cout, cin, 1, 1), f"{name}.skip.bias": (cout,)})
                if resample:
                    shapes[f"{name}.skip.resample_filter"] = (1, 1, 2, 2)
            if flags.get("attn"):
                shapes.update({f"{name}.norm2.weight": (cout,), f"{name}.norm2.bias": (cout,),
                               f"{name}.qkv.weight": (3 * cout, cout, 1, 1), f"{name}.qkv.bias": (3 * cout,),
                               f"{name}.proj.weight": (cout, cout, 1, 1), f"{name}.proj.bias": (cout,)})
    return shapes


def random_songunet(seed=0, **arch):
    """A random EDM-layout state dict; weights scaled so every block (attention too) matters."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in edm_songunet_shapes(**arch).items():
        if key.endswith("resample_filter"):
            sd[key] = torch.full(shape, 0.25)
        elif len(shape) == 1:
            base = 1.0 if ".norm" in key or "aux_norm.weight" in key else 0.0
            sd[key] = base + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            sd[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return sd


def songunet_reference(p, x, c_noise, model_channels, **arch):
    """EDM SongUNet forward (DDPM++) straight from its state dict `p`."""
    def gn(h, name):
        return F.group_norm(h, min(32, h.shape[1] // 4), p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-6)

    def conv(h, name):
        w = p[f"{name}.weight"]
        return F.conv2d(h, w, p[f"{name}.bias"], padding=w.shape[-1] // 2)

    def resample(h, name, flags):
        f = p[f"{name}.resample_filter"].tile([h.shape[1], 1, 1, 1])
        if flags.get("down"):
            return F.conv2d(h, f, groups=h.shape[1], stride=2)
        return F.conv_transpose2d(h, f * 4, groups=h.shape[1], stride=2)

    def block(h, emb, name, flags):
        resampling = flags.get("up") or flags.get("down")
        orig = h
        h = F.silu(gn(h, f"{name}.norm0"))
        h = conv(resample(h, f"{name}.conv0", flags) if resampling else h, f"{name}.conv0")
        h = F.silu(gn(h + F.linear(emb, p[f"{name}.affine.weight"], p[f"{name}.affine.bias"])[:, :, None, None],
                      f"{name}.norm1"))
        h = conv(h, f"{name}.conv1")
        skip = resample(orig, f"{name}.skip", flags) if resampling else orig
        if f"{name}.skip.weight" in p:
            skip = conv(skip, f"{name}.skip")
        h = (h + skip) * math.sqrt(0.5)
        if flags.get("attn"):
            b, c = h.shape[:2]
            q, k, v = conv(gn(h, f"{name}.norm2"), f"{name}.qkv").reshape(b, c, 3, -1).unbind(2)
            w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c)).softmax(dim=2)
            a = torch.einsum("nqk,nck->ncq", w, v).reshape(h.shape)
            h = (conv(a, f"{name}.proj") + h) * math.sqrt(0.5)
        return h

    half = model_channels // 2
    freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32) / (half - 1))
    emb = torch.outer(c_noise, freqs)
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)      # EDM: [cos, sin], then the halves swapped
    emb = F.silu(F.linear(emb, p["map_layer0.weight"], p["map_layer0.bias"]))
    emb = F.silu(F.linear(emb, p["map_layer1.weight"], p["map_layer1.bias"]))
    skips = []
    for name, kind, cin, cout, flags in songunet_modules(model_channels=model_channels, **arch):
        if kind == "conv" and name.startswith("enc"):
            x = conv(x, name)
        elif kind == "norm":
            x = gn(x, name)
        elif kind == "conv":
            return conv(F.silu(x), name)
        else:
            if name.startswith("dec") and x.shape[1] != cin:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb, name, flags)
        if name.startswith("enc"):
            skips.append(x)
    raise AssertionError("no output convolution")


class SongUNet(nn.Module):
    """Stands in for EDM's SongUNet (same class name, same call signature)."""

    def __init__(self, sd, arch):
        super().__init__()
        self.sd, self.arch = sd, arch

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        return songunet_reference(self.sd, x, noise_labels, **self.arch)


class EDMPrecond(nn.Module):
    """Stands in for EDM's EDMPrecond: EDM preconditioning without a σ_min shift."""

    def __init__(self, sd, arch, sigma_data=0.5):
        super().__init__()
        self.model, self.sigma_data = SongUNet(sd, arch), sigma_data

    def state_dict(self, *args, **kwargs):
        return {f"model.{k}": v for k, v in self.model.sd.items()}

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.reshape(-1, 1, 1, 1)
        sd2 = self.sigma_data**2
        c_skip, c_out = sd2 / (sigma**2 + sd2), sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in, c_noise = 1 / (sigma**2 + sd2).sqrt(), sigma.log().flatten() / 4
        return c_skip * x + c_out * self.model(c_in * x, c_noise)


def build_ours(state, arch):
    a = imp.infer_architecture(random_songunet(**arch))
    net = build_denoiser(a.network(), {}, a.img_resolution, a.img_channels)
    net.load_state_dict(state)
    return net.eval()


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "ayt.tools.import_edm", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


# ---- the mapping ----------------------------------------------------------------------------


def test_edm_layout_fills_the_cifar10_preset_with_resample_blocks():
    """EDM's CIFAR-10 DDPM++ layout (shapes only, meta device) maps key for key onto our
    `network=cifar10 network.resample_blocks=true` U-Net: 55.73M parameters, every EDM tensor
    used except map_augment. Catches: a name pairing off by one block or level, a preset that
    drifts from DDPM++ (width, depth, attention), a dropped or extra tensor."""
    sd = {k: torch.empty(s, device="meta") for k, s in edm_songunet_shapes(**CIFAR10).items()}
    arch = imp.infer_architecture(sd)
    preset = OmegaConf.to_container(OmegaConf.load(REPO / "conf/network/cifar10.yaml"))
    assert {k: arch.network()[k] for k in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions",
                                           "embedding")} == {k: preset[k] for k in ("model_channels", "channel_mult",
                                                                                    "num_blocks", "attn_resolutions",
                                                                                    "embedding")}
    state, notes = imp.edm_to_ayt(sd, arch)
    params = sum(t.numel() for t in state.values())
    edm_params = sum(math.prod(s) for k, s in edm_songunet_shapes(augment_dim=0, **CIFAR10).items()
                     if not k.endswith("resample_filter"))
    assert params == edm_params and round(params / 1e6, 2) == 55.73
    assert notes == ["dropped map_augment.weight [128, 9] (EDM's augmentation conditioning, unused when sampling)"]


def test_imported_weights_compute_edms_function():
    """Our denoiser loaded from the import gives the output EDM's SongUNet computes from the
    source tensors (independent reference forward above), for F and for D with σ_min = 0.
    Catches: a missing qkv row permutation, sin/cos halves not swapped, a transposed weight,
    tensors assigned to the wrong block (each changes the output; checked by hand)."""
    sd = random_songunet(seed=1, **SMALL)
    state, _ = imp.edm_to_ayt(sd)
    ours = build_ours(state, SMALL)
    ref = EDMPrecond(sd, SMALL)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 16, 16, generator=gen)
    c_noise = torch.tensor([-1.5, -0.3, 0.4, 1.1])
    with torch.no_grad():
        f_ref = ref.model(x, c_noise)
        f_ours = ours.unet(x, c_noise)
        assert f_ref.abs().max() > 0.1                      # a non-trivial output
        assert torch.allclose(f_ours, f_ref, atol=1e-5, rtol=1e-4), (f_ours - f_ref).abs().max()
        check = imp.compare(ref, ours, imp.infer_architecture(sd))
    assert check["F"] < 1e-4 and check["D"] < 1e-4


def test_round_trip_back_to_edm_names_is_exact():
    """import, then export back to EDM's names, gives the original tensors bit for bit (less
    map_augment). Catches: a mapping that is not one-to-one (two EDM keys onto one of ours, a
    key left out), a layout transform that loses or reorders values."""
    sd = random_songunet(seed=3, **SMALL)
    state, _ = imp.edm_to_ayt(sd)
    back = imp.ayt_to_edm(state, imp.infer_architecture(sd))
    expected = {k: v for k, v in sd.items() if k != "map_augment.weight"}
    assert sorted(back) == sorted(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)


# ---- the command --------------------------------------------------------------------------


def test_cli_imports_a_precond_state_dict(tmp_path):
    """The CLI (subprocess) on `torch.save(precond.state_dict())` (keys `model.*`): exit 0, a
    file build_denoiser loads strictly, shapes as our U-Net's, the values of the in-process
    import, nothing on stderr, and it says what it dropped and that no check ran. Catches:
    the `model.` prefix not stripped, a wrong output format, a CLI that fails to write."""
    sd = random_songunet(seed=4, **SMALL)
    src, out = tmp_path / "edm.pt", tmp_path / "sub" / "denoiser.pt"
    torch.save({f"model.{k}": v for k, v in sd.items()}, src)
    res = cli("--pkl", src, "--out", out)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert "dropped map_augment.weight" in res.stdout and "check skipped" in res.stdout
    assert "network.model_channels=16 network.channel_mult=[1,2,2]" in res.stdout
    loaded = torch.load(out, weights_only=True)
    net = build_ours(loaded, SMALL)
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in net.state_dict().items()}
    expected, _ = imp.edm_to_ayt(sd)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_pickle_needs_edm_src_and_is_checked_against_edm_code(tmp_path, capsys):
    """An EDM-style pickle ({'ema': EDMPrecond}) whose classes live in a module only --edm-src
    provides: without it, one line naming the module and --edm-src, exit 2; with it, the check
    against the pickle's own network runs and prints max differences below 1e-4. Catches:
    --edm-src not put on sys.path, the check not run, the check comparing wrong outputs."""
    src = tmp_path / "edm"
    (src / "torch_utils").mkdir(parents=True)
    (src / "edm_stub_net.py").write_text(
        f"from {__name__} import EDMPrecond as _P, SongUNet as _S\n"
        "class SongUNet(_S): pass\nclass EDMPrecond(_P): pass\n")
    sys.path.insert(0, str(src))
    try:
        stub = importlib.import_module("edm_stub_net")
        sd = random_songunet(seed=5, **SMALL)
        net = stub.EDMPrecond(sd, SMALL)
        net.model.__class__ = stub.SongUNet
        pkl = tmp_path / "edm-small.pkl"
        pkl.write_bytes(pickle.dumps({"ema": net, "loss_fn": None}))
    finally:
        sys.path.remove(str(src))
        sys.modules.pop("edm_stub_net", None)
        importlib.invalidate_caches()

    assert imp.main(["--pkl", str(pkl), "--out", str(tmp_path / "a.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "edm_stub_net" in err[0] and "--edm-src" in err[0]

    assert imp.main(["--pkl", str(pkl), "--edm-src", str(src), "--out", str(tmp_path / "b.pt")]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "check against EDM" in l)
    f_diff = float(line.split("max |F_ayt - F_edm| = ")[1].split()[0])
    d_diff = float(line.split("max |D_ayt - D_edm| = ")[1].split()[0])
    assert f_diff < 1e-4 and d_diff < 1e-4
    sys.modules.pop("edm_stub_net", None)


def test_corrupt_files_give_one_line_and_exit_2(tmp_path, capsys):
    """A truncated torch.save file and a file of random bytes: exactly one stderr line naming
    the file, exit 2, no exception, nothing written. Catches: an uncaught torch/pickle
    exception (a traceback), a message without the path."""
    good = tmp_path / "good.pt"
    torch.save(random_songunet(seed=6, **SMALL), good)
    truncated, garbage = tmp_path / "truncated.pt", tmp_path / "garbage.pkl"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage.write_bytes(bytes(range(7, 256)) * 40)
    for path, words in ((truncated, "truncated or corrupt"), (garbage, "cannot read")):
        assert imp.main(["--pkl", str(path), "--out", str(tmp_path / "x.pt")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("import_edm: error: ") and str(path) in err[0], err
        assert words in err[0]
    assert not (tmp_path / "x.pt").exists()


def test_mismatched_shape_and_missing_key_name_the_key(tmp_path, capsys):
    """One tensor with a wrong shape and one missing tensor: one stderr line naming the EDM key
    and both shapes / the needed shape, exit 2, nothing written. Catches: a shape check that
    is skipped (load_state_dict would raise a multi-line error), a message without the key
    or the shapes."""
    sd = random_songunet(seed=7, **SMALL)
    sd["dec.8x8_block1.conv1.weight"] = torch.zeros(32, 32, 1, 1)
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    assert imp.main(["--pkl", str(bad), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shape mismatch at 'dec.8x8_block1.conv1.weight'" in err[0], err
    assert "[32, 32, 1, 1]" in err[0] and "[32, 32, 3, 3]" in err[0] and not (tmp_path / "x.pt").exists()

    sd = random_songunet(seed=7, **SMALL)
    del sd["enc.8x8_block0.qkv.bias"]
    missing = tmp_path / "missing.pt"
    torch.save(sd, missing)
    assert imp.main(["--pkl", str(missing), "--out", str(tmp_path / "y.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing key 'enc.8x8_block0.qkv.bias'" in err[0] and "[96]" in err[0]


# ---- training.init=file and the paper preset --------------------------------------------


def _smoke_init_file(tmp_path, seed=0):
    cfg = compose_config(["experiment=smoke"])
    from ayt.data import load_dataset
    data = load_dataset(cfg.dataset, train=True)
    torch.manual_seed(seed)
    net = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels)
    path = tmp_path / f"init{seed}.pt"
    torch.save(net.state_dict(), path)
    return path


def test_init_file_is_validated_cached_and_keyed_by_content(tmp_path):
    """training.init=file: a missing path is one ConfigError naming training.init_file; an
    existing file is copied into the cache under a key that (like the run name) follows its
    sha256, so rewriting the file changes both; a file that does not fit the network fails
    naming the field, key and shapes. Catches: the path (not the content) keyed, the file
    not validated, the shape check skipped."""
    from ayt.artifacts import ArtifactCache
    from ayt.data import load_dataset
    from ayt.training.prepare import artifact_record, ensure_init_file

    base = ["experiment=smoke", f"out_dir={tmp_path / 'out'}", "training.init=file"]
    with pytest.raises(ConfigError) as err:
        load_config([*base, f"training.init_file={tmp_path / 'nope.pt'}"])
    assert err.value.field == "training.init_file" and "no such file" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(base)
    assert err.value.field == "training.init_file"

    path = _smoke_init_file(tmp_path, seed=0)
    cfg = load_config([*base, f"training.init_file={path}"])
    data = load_dataset(cfg.dataset, train=True)
    cached = ensure_init_file(cfg, ArtifactCache(cfg.cache_dir), data)
    saved, copy = torch.load(path, weights_only=True), torch.load(cached, weights_only=True)
    assert sorted(copy) == sorted(saved) and all(torch.equal(copy[k], v) for k, v in saved.items())
    name, record = run_name(cfg), artifact_record(cfg)
    assert record["init_file_hash"] == cached.parent.name and len(record["init_file_sha256"]) == 64

    torch.save({k: v + 1 for k, v in saved.items()}, path)           # same path, new content
    cfg2 = load_config([*base, f"training.init_file={path}"])
    assert run_name(cfg2) != name and artifact_record(cfg2)["init_file_hash"] != record["init_file_hash"]

    wide = load_config([*base, f"training.init_file={path}", "network.model_channels=24"])
    with pytest.raises(ConfigError) as err:
        ensure_init_file(wide, ArtifactCache(wide.cache_dir), data)
    assert err.value.field == "training.init_file" and "shape" in str(err.value) and "\n" not in str(err.value)


def test_optimizer_choice_builds_radam(tmp_path):
    """optimizer=radam gives torch.optim.RAdam with lr and adam_betas; an unknown name is a
    ConfigError naming `optimizer`. Catches: the option read nowhere (Adam regardless)."""
    from ayt.data import load_dataset
    from ayt.training.loop import WorkerContext, build_training
    from ayt.training.prepare import Artifacts

    with pytest.raises(ConfigError) as err:
        load_config(["experiment=smoke", f"out_dir={tmp_path}", "optimizer=sgd"])
    assert err.value.field == "optimizer"
    cfg = load_config(["experiment=smoke", f"out_dir={tmp_path}", "optimizer=radam", "training.init=scratch",
                       "loss=pseudo_huber", "lr=3e-4", "adam_betas=[0.9,0.999]"])
    data = load_dataset(cfg.dataset, train=True)
    step = build_training(cfg, Artifacts(), WorkerContext(torch.device("cpu")), data)
    assert type(step.optimizer) is torch.optim.RAdam
    group = step.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(3e-4) and tuple(group["betas"]) == (0.9, 0.999)


def test_paper_preset_composes_with_the_papers_values(tmp_path):
    """`experiment=cifar10_paper` composes and has the ECT/AYT settings; its network is EDM's
    55.73M DDPM++ (resample blocks) and its feature map VGG16-shaped. Catches: a preset value
    drifting from the papers', a preset that no longer composes."""
    cfg = compose_config(["experiment=cifar10_paper"])
    assert cfg.dataset.name == "cifar10" and cfg.dataset.fid_extractor == "inception"
    assert cfg.network.resample_blocks is True and cfg.network.model_channels == 128
    assert list(cfg.network.channel_mult) == [2, 2, 2] and cfg.network.num_blocks == 4
    assert cfg.network.dropout == 0.2
    assert cfg.batch_size == 128 and cfg.optimizer == "radam" and cfg.lr == 1e-4 and cfg.lr_scaling == "none"
    assert list(cfg.adam_betas) == [0.9, 0.999]
    assert cfg.training.ema_decay == 0.9999 and cfg.training.ema_halflife_kimg is None
    assert cfg.training.init == "file" and cfg.training.iterations == 400_000
    assert (cfg.schedule.q, cfg.schedule.k, cfg.schedule.b, cfg.schedule.p_mean, cfg.schedule.p_std) == \
        (256.0, 8.0, 1.0, -1.1, 2.0)
    assert cfg.loss.name == "mfd" and cfg.augment.name == "geo_clr_deg"
    assert cfg.fid.num_samples == 50_000 and cfg.precision == "fp32"      # follows ayt.bench numerics
    assert list(cfg.feature_map.channels) == [64, 128, 256, 512, 512] and cfg.feature_map.convs_per_stage == 3
    assert (cfg.feature_map.iterations, cfg.feature_map.batch_size, cfg.feature_map.lr) == (400_000, 512, 1e-4)
    with torch.device("meta"):
        params = sum(p.numel() for p in build_denoiser(cfg.network, cfg.edm, 32, 3).parameters())
    assert round(params / 1e6, 2) == 55.73


def test_reference_stats_file_is_installed_in_torch_fidelitys_format(tmp_path):
    """fid.reference_stats: an .npz {mu, sigma} in float64 (as EDM ships it) lands where
    torch-fidelity looks up cached statistics, in the dtypes its FID asserts, under a cache
    name that follows the file's content. Catches: mu left float64 (torch-fidelity's dtype
    assertion fails), the file installed under another name (torch-fidelity would silently
    recompute from the training images), a stale cache after the file changes."""
    import numpy as np
    from torch_fidelity import KEY_METRIC_FID
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    from ayt.data import ImageData
    from ayt.eval.fid import FIDEvaluator

    dim, weights, stats = 16, tmp_path / "classifier.pt", tmp_path / "ref.npz"
    weights.write_bytes(b"only hashed here")
    np.savez(stats, mu=np.zeros(dim), sigma=np.eye(dim))
    data = ImageData(images=torch.zeros(4, 1, 8, 8), labels=torch.zeros(4, dtype=torch.long), num_classes=1, name="t")

    def evaluator():
        return FIDEvaluator(data, "classifier", str(weights), str(tmp_path / "fid"), "cpu", reference_stats=str(stats))

    ev = evaluator()
    path = ev.ensure_reference_stats()
    assert path == ev.reference_stats_path and Path(path).is_file()
    installed = torch.load(path, weights_only=False)
    fid = fid_statistics_to_metric(installed, fid_features_to_statistics(torch.randn(64, dim)), False)
    assert math.isfinite(fid[KEY_METRIC_FID])
    np.savez(stats, mu=np.ones(dim), sigma=np.eye(dim))
    assert evaluator().reference_cache_name != ev.reference_cache_name
