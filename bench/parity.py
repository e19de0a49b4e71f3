"""Parity tool: recompute every reference fixture in a folder and compare.

    python -m bench.parity ../shared/parity [--backend reference|triton|cuda|auto] [--attention NAME]
                                            [--rtol 1e-4 --atol 1e-5]

For every NAME in DIR/configs.json: build the model from its constructor arguments, load DIR/NAME.pt through
the public loaders, recompute every output stored in DIR/NAME_io.pt that applies, print max abs / rel errors,
and exit 1 on any mismatch beyond tolerance (or any fixture that could not be checked).

`--attention` forces one of kernels.attention.CHOICES (default: the chooser's own); each DiT fixture's line
`attention: ...` says which path its model ran. With `--attention rope-fused` (the fused RoPE attention kernel, which
runs under the triton / cuda backends, or auto on a GPU), a DiT fixture whose attention it can run but did not is a
failure, one it cannot run (qk-norm, or no RoPE) is checked on the chooser's path and says why, and a folder where it
ran on no fixture fails.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, TextIO

import torch

import kernels
from kernels.attention import CHOICES as ATTENTION_CHOICES, FUSED_BLOCK
from kernels.backend import forget
from modeling.checkpoint import load_dit_checkpoint, load_vavae_checkpoint
from modeling.flow import flow_loss
from modeling.lightningdit import LightningDiT, LightningDiTConfig
from modeling.safe_load import safe_torch_load
from modeling.sampling import sample, time_grid
from modeling.vavae import AutoencoderKL, VAVAEModelConfig
from modeling.vf_loss import vf_loss
from modeling.config import console_entry


def _ctor_args(cls, cfg):
    """The entries of a fixture's configs.json that the model takes (the fixtures also name e.g. 'kind')."""
    if cls is LightningDiT:
        params = {f.name for f in dataclasses.fields(LightningDiTConfig)}
    else:
        params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in cfg.items() if k in params}


Row = tuple  # (label, our output, the fixture's output)


def check_lightningdit(dir_: Path, name: str, cfg: dict, io: dict, device: str = "cpu") -> list[Row]:
    """The DiT fixture's forward, CFG forward, loss and sample, recomputed from its checkpoint."""
    model = LightningDiT(**_ctor_args(LightningDiT, cfg)).eval().to(device)
    ckpt = safe_torch_load(dir_ / f"{name}.pt", "parity checkpoint", map_location=device)
    rows = []
    with torch.no_grad():
        for weights in ("ema", "model"):
            if f"out_{weights}" in io:
                load_dit_checkpoint(ckpt, model, weights)
                rows.append((f"forward ({weights})", model(io["x"], io["t"], io["y"]), io[f"out_{weights}"]))
        load_dit_checkpoint(ckpt, model, "ema")
        for key in sorted(io):
            m = re.fullmatch(r"cfg_t(.+)_out", key)
            if m:
                p = f"cfg_t{m.group(1)}_"
                out = model.forward_with_cfg(io[p + "x"], io[p + "t"], io[p + "y"], float(io["cfg_scale"]),
                                             float(io["cfg_interval_start"]), guidance="reference")
                rows.append((f"guidance t={m.group(1)} (reference mode)", out, io[key]))
        if "loss_x1" in io:
            r = flow_loss(model, io["loss_x1"], io["loss_y"], t=io["loss_t"], x0=io["loss_x0"])
            for term, key in (("mse", "loss_mse"), ("cos", "loss_cos"), ("loss", "loss_total")):
                if key in io:
                    rows.append((f"loss {term}", r[term], io[key]))
        if "sample_z" in io:
            steps, shift = int(io["sample_steps"]), float(io["sample_shift"])
            out, traj = sample(model, io["sample_z"], io["sample_y"], steps=steps, shift=shift,
                               cfg_scale=float(io["sample_cfg_scale"]),
                               cfg_interval_start=float(io["sample_cfg_interval_start"]),
                               guidance="reference", return_trajectory=True)
            rows.append((f"Euler sample ({steps} pts, shift {shift:g}, cfg)", out, io["sample_out"]))
            if "sample_trajectory" in io:
                rows.append(("Euler trajectory", traj, io["sample_trajectory"]))
            if "sample_nocfg_out" in io:
                rows.append(("Euler sample (no cfg, no shift)",
                             sample(model, io["sample_z"], io["sample_y"], steps=steps, shift=1.0), io["sample_nocfg_out"]))
        for key in sorted(io):
            m = re.fullmatch(r"grid(\d+)_shift([0-9.]+)", key)
            if m:
                rows.append((f"time grid {m.group(1)} shift {m.group(2)}",
                             time_grid(int(m.group(1)), float(m.group(2))), io[key]))
    return rows


def check_vavae(dir_: Path, name: str, cfg: dict, io: dict, device: str = "cpu") -> list[Row]:
    """The VA-VAE fixture's posterior (mean, logvar, kl) and decode, recomputed from its checkpoint."""
    model = AutoencoderKL(VAVAEModelConfig(**_ctor_args(VAVAEModelConfig, cfg))).eval().to(device)
    load_vavae_checkpoint(safe_torch_load(dir_ / f"{name}.pt", "parity checkpoint", map_location=device), model)
    rows = []
    with torch.no_grad():
        if "images" in io:
            post = model.encode(io["images"])
            for attr, key in (("mean", "posterior_mean"), ("logvar", "posterior_logvar")):
                if key in io:
                    rows.append((f"posterior {attr}", getattr(post, attr), io[key]))
            if "kl" in io:
                rows.append(("kl", post.kl(), io["kl"]))
        if "z" in io and "decoded" in io:
            rows.append(("decode", model.decode(io["z"]), io["decoded"]))
    return rows


def check_vf_loss(dir_: Path, name: str, cfg: dict, io: dict, device: str = "cpu") -> list[Row]:
    """The VF loss terms (mcos, mdms) at each margin the fixture stores."""
    rows = []
    for key in sorted(io):
        m = re.fullmatch(r"(mcos|mdms)_m([0-9.]+)", key)
        if m:
            margin = float(m.group(2))
            r = vf_loss(io["z_proj"], io["aux_feature"], m1=margin, m2=margin)
            rows.append((f"{m.group(1)} margin {margin}", r[m.group(1)], io[key]))
    return rows


CHECKS = {"lightningdit": check_lightningdit, "vavae": check_vavae, "vf_loss": check_vf_loss}
FUSED_RAN = f"{FUSED_BLOCK} (triton)"  # what describe() says when the fused attention kernel ran


def fused_blocker(cfg: dict) -> Optional[str]:
    """Why the fused attention kernel cannot run this DiT fixture's attention (None: it can)."""
    c = LightningDiTConfig(**_ctor_args(LightningDiT, cfg))
    if not c.use_rope:
        return "no RoPE (the model calls plain attention)"
    return "qk-norm is not fused" if c.use_qknorm else None


def attention_ran() -> str:
    """The attention path the last DiT run took, from kernels.describe()."""
    ran = kernels.describe()["ops"]
    path, kernel = ran.get("rope_attention"), ran.get("attention")
    if path is None:
        return f"attention {kernel}" if kernel else "not run"
    return f"{path} ({kernel})" if path.startswith("split") and kernel else path


def compare(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> tuple[float, float, bool]:
    """(max abs error, normwise relative error, within rtol/atol and finite) of out against ref, in float64."""
    out, ref = torch.as_tensor(out).detach().cpu().double(), torch.as_tensor(ref).detach().cpu().double()
    if out.shape != ref.shape:
        return float("inf"), float("inf"), False
    if out.numel() == 0:
        return 0.0, 0.0, True
    err = (out - ref).abs()
    ok = bool(torch.all(err <= atol + rtol * ref.abs()) and torch.isfinite(out).all())
    rel = (err.norm() / ref.norm().clamp_min(1e-30)).item()  # normwise relative error
    return err.max().item(), rel, ok


def run(dir_: str | Path, rtol: float = 1e-4, atol: float = 1e-5, out: Optional[TextIO] = None, device: str = "cpu",
        attention: Optional[str] = None) -> int:
    """Check every fixture in dir_, print one line per comparison (to `out`, default the sys.stdout of the call);
    returns the number of failures. attention: force that implementation (kernels.set_attention; None leaves the
    choice as it is, e.g. $VAVAE_ATTENTION's)."""
    out = out if out is not None else sys.stdout
    dir_ = Path(dir_)
    if attention is not None:
        kernels.set_attention(attention)
    forced = attention or os.environ.get("VAVAE_ATTENTION") or None  # (the env var forces from kernels' import)
    try:
        configs = json.loads((dir_ / "configs.json").read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{dir_ / 'configs.json'}: cannot read the fixture list "
                                f"({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(configs, dict):
        raise FileNotFoundError(f"{dir_ / 'configs.json'}: expected a mapping of fixture name -> config")
    failures = 0
    print(f"kernels backend: {kernels.get_backend()}; attention: "
          f"{forced + ' (forced)' if forced else 'the chooser (not forced)'}", file=out)
    print(f"{'fixture':<18} {'check':<44} {'max abs':>10} {'norm rel':>10}  ok", file=out)
    paths = {}  # DiT fixture -> the attention path its model ran
    for name, cfg in configs.items():
        io_path = dir_ / f"{name}_io.pt"
        kind = cfg.get("kind")
        if kind not in CHECKS or not io_path.is_file():
            print(f"{name:<18} {'(cannot check: kind ' + str(kind) + ', io ' + str(io_path.is_file()) + ')':<44}"
                  f" {'-':>10} {'-':>10}  FAIL", file=out)
            failures += 1
            continue
        dit = kind == "lightningdit"
        blocker = fused_blocker(cfg) if dit and forced == FUSED_BLOCK else None
        if dit:  # what this fixture's model runs, not a previous one's
            forget("rope_attention")
            forget("attention")
        try:
            if blocker:  # forcing would raise: checked on the chooser's path instead, and said so below
                kernels.set_attention(None)
            io = safe_torch_load(io_path, "parity fixture", map_location=device)
            rows = CHECKS[kind](dir_, name, cfg, io, device)
        except Exception as e:  # a fixture that cannot be recomputed is a failure, with the reason
            print(f"{name:<18} ERROR {type(e).__name__}: {e}", file=out)
            failures += 1
            continue
        finally:
            if blocker:
                kernels.set_attention(forced)
        if not rows:
            print(f"{name:<18} {'(no comparable outputs in io file)':<44} {'-':>10} {'-':>10}  FAIL", file=out)
            failures += 1
        for label, o, r in rows:
            abs_err, rel_err, ok = compare(o, r, rtol, atol)
            failures += not ok
            print(f"{name:<18} {label:<44} {abs_err:>10.2e} {rel_err:>10.2e}  {'ok' if ok else 'FAIL'}", file=out)
        if dit:
            paths[name] = path = attention_ran()
            note = ""
            if blocker:
                note = f" -- {FUSED_BLOCK} cannot run this model ({blocker}): checked on the chooser's path"
            elif forced == FUSED_BLOCK and path != FUSED_RAN:  # e.g. the reference backend: forcing did nothing
                note = (f" -- FAIL: {FUSED_BLOCK} was forced but did not run (it needs --backend triton or cuda, "
                        f"or auto on a GPU; TRITON_INTERPRET=1 on the CPU)")
                failures += 1
            print(f"{name:<18} attention: {path}{note}", file=out)
    print(f"device: {device}; kernels: {kernels.describe()['ops']}", file=out)
    fused_on = [n for n, p in paths.items() if p == FUSED_RAN]
    print(f"attention: {forced or 'not forced'}; ran: "
          f"{'; '.join(f'{n} {p}' for n, p in paths.items()) or 'no DiT fixture'}", file=out)
    if forced == FUSED_BLOCK and not fused_on:  # nothing here exercised the fused kernel: not a pass
        print(f"FAIL: {FUSED_BLOCK} was forced but ran on no fixture", file=out)
        failures += 1
    print(f"{'all within' if not failures else str(failures) + ' outside'} rtol {rtol}, atol {atol}", file=out)
    return failures


def main(argv: list[str] | None = None) -> None:
    from modeling.config import cli_parser

    ap = cli_parser("bench.parity", __doc__)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--atol", type=float, default=1e-5)
    ap.add_argument("--backend", default=None, choices=kernels.backend.BACKENDS, help="kernels backend to force")
    ap.add_argument("--device", default="cpu", help="run the models on this device (fp32), e.g. cuda")
    ap.add_argument("--attention", default=None, metavar="NAME",
                    help=f"attention implementation to force, one of {', '.join(ATTENTION_CHOICES)} (default: the "
                         f"chooser's own); {FUSED_BLOCK} fails where it runs on no fixture")
    args = ap.parse_args(argv)
    if args.attention is not None and args.attention not in ATTENTION_CHOICES:
        print(f"error: unknown --attention {args.attention!r}; choose from {', '.join(ATTENTION_CHOICES)}",
              file=sys.stderr)
        sys.exit(2)
    try:
        probe = torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError, ValueError) as e:  # no such device here
        print(f"error: --device {args.device}: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    if args.backend:
        kernels.set_backend(args.backend)
        status = {"triton": kernels.backend.triton_status, "cuda": kernels.backend.cuda_status}.get(args.backend)
        usable, why = status(probe) if status else (True, "")
        if not usable:  # every fixture would be an ERROR row, summed as "outside rtol": it could not run at all
            print(f"error: --backend {args.backend} cannot run on {args.device}: {why}", file=sys.stderr)
            sys.exit(2)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 arithmetic
        torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():  # (a context: main() called in-process leaves grad mode as it was)
            failures = run(args.dir, args.rtol, args.atol, device=args.device, attention=args.attention)
    except FileNotFoundError as e:  # a user mistake: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if failures else 0)


cli = console_entry(__name__)  # the `vavae-parity` console script (setup.py)

if __name__ == "__main__":
    main()
