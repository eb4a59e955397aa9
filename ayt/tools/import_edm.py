"""Import NVlabs EDM's pretrained DDPM++ network into ayt's denoiser.

    python -m ayt.tools.import_edm --pkl edm-cifar10-32x32-uncond-vp.pkl --edm-src ~/edm --out denoiser.pt

Reads an EDM network pickle (a dict whose ``'ema'`` entry is an ``EDMPrecond`` around a
``SongUNet``; unpickling needs EDM's own ``torch_utils``/``dnnlib`` modules, looked up in
``--edm-src``, a local checkout of github.com/NVlabs/edm, which is never vendored here) or a
plain state dict (``torch.save`` of the SongUNet's or the precond's ``state_dict()``). The
SongUNet weights are mapped onto ayt's U-Net with ``network.resample_blocks=true`` (the same
DDPM++ function) and written as a state dict of ayt's ``EDMPrecond``, the file
``training.init=file training.init_file=...`` starts consistency training from.

Layout differences handled (EDM's side: ``training/networks.py`` of NVlabs/edm):

* names: EDM's ModuleDicts ``enc.32x32_conv``, ``enc.16x16_down``, ``dec.8x8_in0``,
  ``dec.32x32_aux_norm``/``_aux_conv`` are ayt's ``unet.in_conv``, ``unet.enc.<i>``,
  ``unet.dec.<i>``, ``unet.out_norm``/``out_conv``, paired level by level (`module_pairs`);
* noise embedding: EDM swaps the halves of the embedding to [sin, cos] before
  ``map_layer0``; ayt feeds [cos, sin], so map_layer0's input columns are swapped;
* attention: EDM splits the qkv convolution's output channels as [C, 3] (channel 3c + j),
  ayt as [3, C] (channel jC + c), so the qkv rows are permuted;
* dropped: ``map_augment.weight`` (EDM's augmentation-label conditioning, unused when
  sampling; ECT and AYT drop it too) and the fixed [1, 1] ``resample_filter`` buffers
  (ayt's 2x2 box down / nearest up is the same filter, without a buffer).

When the pickle's own classes are importable, the result is checked: EDM's network and
ayt's give the same output on random inputs (the raw U-Net F, and for an EDMPrecond the
denoiser D without ayt's σ_min shift), and the largest difference is printed. Any error
is one line on stderr naming the key and the shapes, exit code 2.

Unpickling runs code from the file: only import pickles from a source you trust.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import pickle
import re
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ayt.networks.precond import build_denoiser

DROPPED_KEYS = ("map_augment.weight",)   # EDM's augmentation conditioning (augment_dim=9 on CIFAR-10)
DEFAULT_TOLERANCE = 1e-4                  # max |ayt - EDM| relative to max(1, max |EDM|)


class ImportFailure(Exception):
    """What is wrong with the source file, in one line (the key and the shapes)."""


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(n) for n in t.shape) + "]"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) < 200 else text[:197] + "..."


# ---- the architecture, read off the checkpoint -------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """The SongUNet hyper-parameters a state dict implies, as ayt's `network.*` values."""

    img_resolution: int
    img_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_blocks: int
    attn_resolutions: tuple[int, ...]
    embedding: str  # positional (DDPM++) | fourier

    def network(self) -> dict[str, Any]:
        """`network.*` config values (dropout is not in a checkpoint: it stays the preset's)."""
        return {"model_channels": self.model_channels, "channel_mult": list(self.channel_mult),
                "num_blocks": self.num_blocks, "attn_resolutions": list(self.attn_resolutions),
                "embedding": self.embedding, "resample_blocks": True}

    def overrides(self) -> str:
        def fmt(v: Any) -> str:
            if isinstance(v, bool):
                return str(v).lower()
            return "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v)
        return " ".join(f"network.{k}={fmt(v)}" for k, v in self.network().items())

    def levels(self) -> list[tuple[int, int]]:
        """(level, resolution) from the input resolution down."""
        return [(level, self.img_resolution >> level) for level in range(len(self.channel_mult))]


def infer_architecture(sd: Mapping[str, Tensor]) -> Architecture:
    """Read width, depth, levels and attention resolutions off EDM's SongUNet key names."""
    convs = [k for k in sd if re.fullmatch(r"enc\.(\d+)x\1_conv\.weight", k)]
    if len(convs) != 1:
        raise ImportFailure("missing key 'enc.<R>x<R>_conv.weight' (the input convolution of EDM's SongUNet): "
                            "not an EDM DDPM++ network or its state dict")
    res = int(re.match(r"enc\.(\d+)x", convs[0]).group(1))
    w = sd[convs[0]]
    if w.dim() != 4:
        raise ImportFailure(f"shape mismatch at {convs[0]!r}: the file has {_shape(w)}, a 3x3 convolution "
                            "[model_channels, in_channels, 3, 3] expected")
    model_channels, channels = int(w.shape[0]), int(w.shape[1])
    mults, attn = [], []
    r = res
    while f"enc.{r}x{r}_block0.conv0.weight" in sd:
        key = f"enc.{r}x{r}_block0.conv0.weight"
        width = int(sd[key].shape[0])
        if width % model_channels:
            raise ImportFailure(f"shape mismatch at {key!r}: the file has {_shape(sd[key])}, whose output width "
                                f"is not a multiple of model_channels={model_channels}")
        mults.append(width // model_channels)
        if f"enc.{r}x{r}_block0.qkv.weight" in sd:
            attn.append(r)
        r //= 2
    if not mults:
        raise ImportFailure(f"missing key 'enc.{res}x{res}_block0.conv0.weight' (the first residual block)")
    num_blocks = 0
    while f"enc.{res}x{res}_block{num_blocks}.conv0.weight" in sd:
        num_blocks += 1
    return Architecture(img_resolution=res, img_channels=channels, model_channels=model_channels,
                        channel_mult=tuple(mults), num_blocks=num_blocks, attn_resolutions=tuple(attn),
                        embedding="fourier" if "map_noise.freqs" in sd else "positional")


# ---- names: ayt's module paths <-> EDM's -----------------------------------------------


def module_pairs(arch: Architecture) -> list[tuple[str, str]]:
    """(ayt module path, EDM module path) for every module with weights, in forward order."""
    top = arch.img_resolution
    pairs = [("unet.map_noise", "map_noise"), ("unet.map_layer0", "map_layer0"),
             ("unet.map_layer1", "map_layer1"), ("unet.in_conv", f"enc.{top}x{top}_conv")]
    enc = []
    for level, r in arch.levels():
        if level > 0:
            enc.append(f"enc.{r}x{r}_down")
        enc += [f"enc.{r}x{r}_block{i}" for i in range(arch.num_blocks)]
    dec = []
    for level, r in reversed(arch.levels()):
        dec += [f"dec.{r}x{r}_in0", f"dec.{r}x{r}_in1"] if level == len(arch.channel_mult) - 1 else [f"dec.{r}x{r}_up"]
        dec += [f"dec.{r}x{r}_block{i}" for i in range(arch.num_blocks + 1)]
    pairs += [(f"unet.enc.{i}", name) for i, name in enumerate(enc)]
    pairs += [(f"unet.dec.{i}", name) for i, name in enumerate(dec)]
    pairs += [("unet.out_norm", f"dec.{top}x{top}_aux_norm"), ("unet.out_conv", f"dec.{top}x{top}_aux_conv")]
    return pairs


def _swap_halves(t: Tensor) -> Tensor:
    """[sin, cos] <-> [cos, sin] along map_layer0's input dimension (its own inverse)."""
    first, second = t.chunk(2, dim=1)
    return torch.cat([second, first], dim=1)


def _qkv_edm_to_ayt(t: Tensor) -> Tensor:
    """Output channel 3c + j (EDM) -> j·C + c (ayt)."""
    return t.reshape(t.shape[0] // 3, 3, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def _qkv_ayt_to_edm(t: Tensor) -> Tensor:
    return t.reshape(3, t.shape[0] // 3, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def _layout(ayt_key: str, to_ayt: bool) -> Callable[[Tensor], Tensor]:
    if ayt_key == "unet.map_layer0.weight":
        return _swap_halves
    if ayt_key.endswith((".qkv.weight", ".qkv.bias")):
        return _qkv_edm_to_ayt if to_ayt else _qkv_ayt_to_edm
    return lambda t: t


def edm_key_for(ayt_key: str, prefixes: Mapping[str, str]) -> str:
    parts = ayt_key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n])
        if head in prefixes:
            return prefixes[head] + "." + ".".join(parts[n:])
    raise KeyError(ayt_key)  # a module of ayt's U-Net that module_pairs does not know: a bug here


def template_state(arch: Architecture, device: str | torch.device = "meta") -> dict[str, Tensor]:
    """ayt's denoiser state dict for `arch` (on the meta device: shapes only, no memory)."""
    with torch.device(device):
        net = build_denoiser(arch.network(), {}, arch.img_resolution, arch.img_channels)
    return net.state_dict()


def _check_resample_filter(key: str, t: Tensor) -> None:
    box = torch.full((1, 1, 2, 2), 0.25)
    ok = tuple(t.shape) == (1, 1, 2, 2) and (t.is_meta or torch.allclose(t.float().cpu(), box))
    if not ok:
        raise ImportFailure(f"unsupported resampling filter at {key!r}: the file has {_shape(t)}, ayt implements "
                            "DDPM++'s [1, 1] filter [1, 1, 2, 2] only (NCSN++ uses [1, 3, 3, 1])")


def edm_to_ayt(sd: Mapping[str, Tensor], arch: Architecture | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """EDM SongUNet state dict -> (ayt EDMPrecond state dict, notes on what was dropped)."""
    arch = arch or infer_architecture(sd)
    src = dict(sd)
    notes = []
    for key in list(src):
        if key.endswith(".resample_filter"):
            _check_resample_filter(key, src.pop(key))
        elif key in DROPPED_KEYS:
            notes.append(f"dropped {key} {_shape(src.pop(key))} (EDM's augmentation conditioning, unused when sampling)")
        elif key.startswith("map_label."):
            raise ImportFailure(f"unsupported key {key!r} {_shape(src[key])}: a class-conditional EDM network; "
                                "ayt's U-Net is unconditional")
    prefixes = dict(module_pairs(arch))
    out = {}
    for key, target in template_state(arch).items():
        edm_key = edm_key_for(key, prefixes)
        if edm_key not in src:
            raise ImportFailure(f"missing key {edm_key!r}: ayt's {key} needs shape {_shape(target)} "
                                f"({arch.overrides()})")
        t = src.pop(edm_key)
        if tuple(t.shape) != tuple(target.shape):
            raise ImportFailure(f"shape mismatch at {edm_key!r}: the file has {_shape(t)}, ayt's U-Net expects "
                                f"{_shape(target)} for {key} ({arch.overrides()})")
        out[key] = _layout(key, to_ayt=True)(t.detach()).to(dtype=target.dtype, copy=True)
    if src:
        key = next(iter(src))
        raise ImportFailure(f"unexpected key {key!r} {_shape(src[key])} (and {len(src) - 1} more): not part of the "
                            "DDPM++ SongUNet ayt imports (NCSN++, ADM and other encoders are not supported)")
    return out, notes


def ayt_to_edm(state: Mapping[str, Tensor], arch: Architecture) -> dict[str, Tensor]:
    """The inverse map: ayt EDMPrecond state dict -> EDM SongUNet state dict (no map_augment)."""
    prefixes = dict(module_pairs(arch))
    out = {}
    for key, t in state.items():
        out[edm_key_for(key, prefixes)] = _layout(key, to_ayt=False)(t)
    for _, edm in module_pairs(arch):
        if edm.endswith(("_down", "_up")):
            for conv in ("conv0", "skip"):
                out[f"{edm}.{conv}.resample_filter"] = torch.full((1, 1, 2, 2), 0.25)
    return out


# ---- reading the source file -------------------------------------------------------------


@dataclass
class Source:
    state: dict[str, Tensor]        # SongUNet keys (a precond's "model." prefix removed)
    network: nn.Module | None       # the unpickled EDM network, when there was one
    kind: str                       # what the file was, for the report


@contextlib.contextmanager
def _on_sys_path(directory: str | None) -> Iterator[None]:
    if not directory:
        yield
        return
    path = Path(directory).expanduser().resolve()
    if not path.is_dir():
        raise ImportFailure(f"--edm-src {directory}: no such directory (a checkout of github.com/NVlabs/edm)")
    if not (path / "torch_utils").is_dir():
        raise ImportFailure(f"--edm-src {directory}: has no torch_utils/ (expected a checkout of github.com/NVlabs/edm)")
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(path))


def read_source(path: str | os.PathLike, edm_src: str | None = None) -> Source:
    """A torch.save'd state dict (zip) or an EDM network pickle -> SongUNet state dict."""
    path = Path(path)
    if not path.is_file():
        raise ImportFailure(f"{path}: no such file")
    network = None
    if zipfile.is_zipfile(path):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ImportFailure(f"cannot read {path} as a torch state dict: {_one_line(err)}") from None
        kind = "state dict"
    else:
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head.startswith(b"PK"):
            raise ImportFailure(f"cannot read {path}: a torch.save zip file, truncated or corrupt")
        with _on_sys_path(edm_src):
            try:
                with open(path, "rb") as handle:
                    obj = pickle.load(handle)
            except ModuleNotFoundError as err:
                hint = ("pass --edm-src DIR, a local checkout of github.com/NVlabs/edm (its torch_utils and dnnlib)"
                        if not edm_src else f"EDM's code in --edm-src needs it: pip install {str(err.name).split('.')[0]}")
                raise ImportFailure(f"cannot unpickle {path}: module {err.name!r} not found; {hint}") from None
            except Exception as err:
                raise ImportFailure(f"cannot read {path}: neither a torch state dict nor a network pickle, or "
                                    f"corrupt ({type(err).__name__}: {_one_line(err)})") from None
        kind = "pickle"
    if isinstance(obj, Mapping) and "ema" in obj:
        obj = obj["ema"]
    elif kind == "pickle" and isinstance(obj, Mapping):
        raise ImportFailure(f"missing key 'ema' in {path}: an EDM network pickle keeps the network there "
                            f"(keys found: {', '.join(map(str, list(obj)[:6]))})")
    if isinstance(obj, nn.Module):
        network, state = obj, obj.state_dict()
        kind = f"{type(obj).__name__} {kind}"
    elif isinstance(obj, Mapping):
        state = dict(obj)
    else:
        raise ImportFailure(f"{path} holds a {type(obj).__name__}, neither a network nor a state dict")
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ImportFailure(f"entry {key!r} of {path} is a {type(value).__name__}, not a tensor")
    state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    return Source(state=state, network=network, kind=kind)


# ---- checking against EDM's own code -------------------------------------------------------


@torch.no_grad()
def compare(network: nn.Module, denoiser: nn.Module, arch: Architecture, batch: int = 8,
            seed: int = 0) -> dict[str, float]:
    """Largest |ayt - EDM| of the raw U-Net F and (EDMPrecond) of the denoiser D on random inputs.

    σ spans 0.002..80 log-uniformly. ayt's D shifts c_skip/c_out by σ_min (D(x, σ_min) = x);
    EDM's does not, so D is compared with ayt's σ_min set to 0, where the two formulas agree.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, arch.img_channels, arch.img_resolution, arch.img_resolution)
    sigma = torch.exp(torch.linspace(math.log(0.002), math.log(80.0), batch))
    x = torch.randn(shape, generator=gen) * 0.5 + sigma.view(-1, 1, 1, 1) * torch.randn(shape, generator=gen)
    network, denoiser = network.eval().float(), denoiser.eval().float()
    sigma_data = float(getattr(network, "sigma_data", 0.5))
    c_in = (1.0 / (sigma**2 + sigma_data**2).sqrt()).view(-1, 1, 1, 1)
    c_noise = sigma.log() / 4
    f_edm = network.model(c_in * x, c_noise, class_labels=None).float()
    f_ayt = denoiser.unet(c_in * x, c_noise).float()
    out = {"F": float((f_ayt - f_edm).abs().max()), "F_scale": float(f_edm.abs().max())}
    if type(network).__name__ == "EDMPrecond":
        d_edm = network(x, sigma).float()
        saved = denoiser.sigma_min, denoiser.sigma_data
        denoiser.sigma_min, denoiser.sigma_data = 0.0, sigma_data
        try:
            d_ayt = denoiser(x, sigma).float()
        finally:
            denoiser.sigma_min, denoiser.sigma_data = saved
        out.update(D=float((d_ayt - d_edm).abs().max()), D_scale=float(d_edm.abs().max()))
    return out


# ---- the command ------------------------------------------------------------------------------


def _save_atomic(state: dict[str, Tensor], out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    digest = hashlib.sha256()
    with open(out, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_edm(pkl: str | os.PathLike, out: str | os.PathLike, edm_src: str | None = None,
               any_precond: bool = False, tolerance: float = DEFAULT_TOLERANCE,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Read `pkl`, map it onto ayt's denoiser, check it when EDM's code is there, write `out`."""
    source = read_source(pkl, edm_src)
    network = source.network
    if network is not None:
        cls, model = type(network).__name__, getattr(network, "model", None)
        if type(model).__name__ != "SongUNet":
            raise ImportFailure(f"{pkl}: {cls}.model is a {type(model).__name__}; only EDM's SongUNet (DDPM++) "
                                "can be imported")
        if cls != "EDMPrecond" and not any_precond:
            raise ImportFailure(f"{pkl} holds a {cls}: its U-Net was trained under another preconditioning than "
                                "ayt's EDM one, so the imported denoiser would compute another function; use an "
                                "edm-*.pkl network (EDMPrecond) or pass --any-precond to import the weights anyway")
    arch = infer_architecture(source.state)
    state, notes = edm_to_ayt(source.state, arch)
    log(f"import_edm: read {len(source.state)} tensors from {pkl} ({source.kind})")
    log(f"import_edm: architecture {arch.img_resolution}x{arch.img_resolution}x{arch.img_channels}: {arch.overrides()}")
    for note in notes:
        log(f"import_edm: {note}")
    check: dict[str, float] = {}
    if network is None:
        log("import_edm: check skipped: a plain state dict carries no EDM code to compare against "
            "(import the .pkl with --edm-src to check)")
    else:
        denoiser = build_denoiser(arch.network(), {}, arch.img_resolution, arch.img_channels)
        denoiser.load_state_dict(state)
        check = compare(network, denoiser, arch)
        parts = [f"max |F_ayt - F_edm| = {check['F']:.3g} (outputs up to {check['F_scale']:.3g})"]
        if "D" in check:
            parts.append(f"max |D_ayt - D_edm| = {check['D']:.3g} (outputs up to {check['D_scale']:.3g})")
        log("import_edm: check against EDM's own network on 8 random inputs, sigma 0.002..80: " + "; ".join(parts))
        for name in ("F", "D"):
            if name in check and not check[name] <= tolerance * max(1.0, check[f"{name}_scale"]):
                raise ImportFailure(f"check failed: max |{name}_ayt - {name}_edm| = {check[name]:.3g} exceeds the "
                                    f"tolerance {tolerance:g} x max(1, {check[f'{name}_scale']:.3g})")
    sha = _save_atomic(state, Path(out))
    params = sum(t.numel() for k, t in state.items() if not k.endswith(".freqs"))
    log(f"import_edm: wrote {out} ({params:,} parameters, sha256 {sha[:16]}); train from it with "
        f"training.init=file training.init_file={Path(out).resolve()}")
    return {"architecture": arch, "notes": notes, "check": check, "sha256": sha, "parameters": params}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ayt.tools.import_edm",
        description="Map NVlabs EDM's DDPM++ weights onto ayt's denoiser (writes a state dict for "
                    "training.init=file). Unpickling runs code from the file: only trusted pickles.")
    parser.add_argument("--pkl", required=True, metavar="PATH",
                        help="EDM network pickle (e.g. edm-cifar10-32x32-uncond-vp.pkl) or a torch.save'd state "
                             "dict of its SongUNet or precond")
    parser.add_argument("--edm-src", metavar="DIR", default=None,
                        help="a local checkout of github.com/NVlabs/edm, put on sys.path to unpickle "
                             "(torch_utils, dnnlib)")
    parser.add_argument("--out", required=True, metavar="PATH", help="where to write ayt's denoiser state dict")
    parser.add_argument("--any-precond", action="store_true",
                        help="import the U-Net of a VPPrecond/VEPrecond pickle too (a different function)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest allowed |ayt - EDM| relative to max(1, max |EDM|) (default %(default)g)")
    args = parser.parse_args(argv)
    try:
        import_edm(args.pkl, args.out, edm_src=args.edm_src, any_precond=args.any_precond, tolerance=args.tolerance)
    except ImportFailure as err:
        print(f"import_edm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
