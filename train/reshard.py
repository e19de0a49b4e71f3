"""Elastic resume: a DeepSpeed checkpoint written by N ranks under ZeRO stage s, loaded by M ranks under stage s'.

    full = read_full_state(step_dir / tag)      # every rank's files -> full fp32 weights, Adam moments and step
    load_full_state(engine, optimizer, full)    # into a freshly built engine, whatever its world size and stage

`read_full_state` is our own consolidation of the files DeepSpeed 0.19 writes (read back with weights_only=True):

    stage 0      mp_rank_00_model_states.pt: "module" (full weights, buffers) and "optimizer" (the torch
                 optimizer's state dict: per parameter step / exp_avg / exp_avg_sq)
    stage 1, 2   mp_rank_00_model_states.pt ("module", "param_shapes") + zero_pp_rank_R_mp_rank_00_optim_states.pt
                 per rank: the rank's slice of each group's flat fp32 master ("single_partition_of_fp32_groups",
                 padding stripped), the base optimizer's state over the same slice (padded), and
                 "param_slice_mappings": name -> (start, numel) of the parameter's fragment in that slice.
                 A parameter is its fragments in rank order.
    stage 3      zero_pp_rank_R_mp_rank_00_model_states.pt ("param_shapes", buffers) + ..._optim_states.pt per
                 rank: "fp32_flat_groups" (one flat per sub-group) and the base optimizer's state per sub-group.
                 Every parameter is split on its own: ceil(numel / N) elements per rank (the last padded), laid
                 out in param_shapes order.

The moments follow exactly the layout of the fp32 weights they belong to, so one walk reads all three.
`load_full_state` writes the full tensors into the new engine's own partitions: stage 0 through the torch
optimizer's load_state_dict; stages 1-2 through each parameter's fragment address in this rank's flat partition
(`param._hp_mapping`, what DeepSpeed's safe_get/set_full_* APIs use); stage 3 through the documented
`safe_set_local_fp32_param` / `safe_set_local_optimizer_state` for this rank's partition of each parameter, the
working weights through `GatheredParameters`. Cost: every rank holds the whole model's fp32 weights and moments
in host memory once (12 bytes per parameter: 8 GB for XL/1) while it loads.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from modeling.config import ConfigError
from modeling.safe_load import safe_torch_load

from .checkpoint import deepspeed_allowed_globals

MODEL_FILE = "mp_rank_00_model_states.pt"


def _zero_model_file(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def _optim_file(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


@dataclass
class FullState:
    """One engine's state, independent of how many ranks wrote it and how: full fp32 tensors by parameter name."""
    zero_stage: int
    world_size: int                      # the ranks that wrote it
    params: dict[str, torch.Tensor]      # fp32 master weights
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # "exp_avg" -> {name: tensor}
    step: Optional[torch.Tensor] = None  # Adam's step count; None: the optimizer never stepped (no moments)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    global_steps: int = 0                # DeepSpeed's counters
    global_samples: int = 0
    skipped_steps: int = 0


def _load(path: Path) -> dict:
    return safe_torch_load(path, "DeepSpeed checkpoint file", allow=deepspeed_allowed_globals())


def _counters(sd: dict) -> dict[str, int]:
    return {k: int(sd.get(k) or 0) for k in ("global_steps", "global_samples", "skipped_steps")}


def _stage_of(sd: dict) -> int:
    return int((sd.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))


def _moments_of(state: dict) -> dict[str, torch.Tensor]:
    """The per-element tensors of one optimizer state entry (exp_avg, exp_avg_sq, ... but not step)."""
    return {k: v for k, v in state.items() if k != "step" and torch.is_tensor(v) and v.dim() > 0}


def read_full_state(folder: Path, param_order: Optional[list[str]] = None) -> FullState:
    """The full fp32 state of the engine checkpoint in `folder` (STEP_DIR/TAG). `param_order`: the parameter names
    in the torch optimizer's order, needed for a stage-0 checkpoint (its optimizer state is indexed by position)."""
    folder = Path(folder)
    if (folder / MODEL_FILE).is_file():
        model = _load(folder / MODEL_FILE)
        stage = _stage_of(model)
        if stage == 0:
            return _read_stage0(folder, model, param_order)
        return _read_stage12(folder, model, stage)
    if (folder / _zero_model_file(0)).is_file():
        return _read_stage3(folder)
    raise ConfigError(f"{folder} holds no DeepSpeed checkpoint ({MODEL_FILE} or {_zero_model_file(0)} missing)")


def _buffers(module_sd: dict, buffer_names) -> dict[str, torch.Tensor]:
    names = set(buffer_names or ())
    return {k: v for k, v in module_sd.items() if k in names}


def _read_stage0(folder: Path, model: dict, param_order: Optional[list[str]]) -> FullState:
    module = model["module"]
    opt = model.get("optimizer") or {}
    buffers = _buffers(module, model.get("buffer_names"))
    params = {k: v.float() for k, v in module.items() if k not in buffers}
    full = FullState(0, int(model.get("dp_world_size") or 1), params, buffers=buffers, **_counters(model))
    states = opt.get("state") or {}
    if states:
        if param_order is None:
            raise ValueError("a stage-0 checkpoint's optimizer state needs the parameters' order")
        indices = [i for g in opt["param_groups"] for i in g["params"]]
        if len(indices) != len(param_order):
            raise ConfigError(f"{folder}: its optimizer holds {len(indices)} parameters, this model's "
                              f"{len(param_order)}")
        for i, name in zip(indices, param_order):
            if i not in states:
                continue
            s = states[i]
            full.step = s["step"].clone() if torch.is_tensor(s["step"]) else torch.tensor(float(s["step"]))
            for key, value in _moments_of(s).items():
                if value.shape != params[name].shape:
                    raise ConfigError(f"{folder}: optimizer state {key} of {name} has shape {tuple(value.shape)}, "
                                      f"the parameter {tuple(params[name].shape)}")
                full.moments.setdefault(key, {})[name] = value.float()
    return full


def _rank_files(folder: Path, world: int, name) -> list[Path]:
    files = [folder / name(r) for r in range(world)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{folder} was written by {world} ranks but lacks {', '.join(missing[:3])}")
    return files


def _read_stage12(folder: Path, model: dict, stage: int) -> FullState:
    world = int(model.get("dp_world_size") or 1)
    module = model["module"]
    buffers = _buffers(module, model.get("buffer_names"))
    shapes = model["param_shapes"]  # one ordered {name: shape} per parameter group
    trainable = {name for group in shapes for name in group}
    # frozen parameters (the DiT's fixed pos_embed): whole in "module" (frozen_param_shapes is not always written)
    frozen = {k: v.float() for k, v in module.items() if k not in buffers and k not in trainable}
    ranks = [_load(f)["optimizer_state_dict"] for f in _rank_files(folder, world, _optim_file)]
    full = FullState(stage, world, dict(frozen), buffers=buffers, **_counters(model))
    for g, group_shapes in enumerate(shapes):
        masters = [r["single_partition_of_fp32_groups"][g] for r in ranks]
        states = [r["base_optimizer_state"]["state"].get(g, {}) for r in ranks]
        if any(states) and not all(states):
            raise ConfigError(f"{folder}: some ranks' optimizer state of group {g} is missing")
        moments = {k: [s[k] for s in states] for k in _moments_of(states[0])} if states[0] else {}
        if states[0]:
            s = states[0]["step"]
            full.step = s.clone() if torch.is_tensor(s) else torch.tensor(float(s))
        for name, shape in group_shapes.items():
            pieces = [(r, r_state["param_slice_mappings"][g][name]) for r, r_state in enumerate(ranks)
                      if name in r_state["param_slice_mappings"][g]]
            numel = math.prod(shape)
            if sum(a.numel for _, a in pieces) != numel:
                raise ConfigError(f"{folder}: the ranks' fragments of {name} hold "
                                  f"{sum(a.numel for _, a in pieces)} of its {numel} elements")
            full.params[name] = torch.cat([masters[r].narrow(0, a.start, a.numel) for r, a in pieces]).float() \
                .view(shape)
            for key, per_rank in moments.items():
                full.moments.setdefault(key, {})[name] = torch.cat(
                    [per_rank[r].narrow(0, a.start, a.numel) for r, a in pieces]).float().view(shape)
    return full


def _read_stage3(folder: Path) -> FullState:
    model = _load(folder / _zero_model_file(0))
    world = int(model.get("dp_world_size") or 1)
    models = [model] + [_load(f) for f in _rank_files(folder, world, _zero_model_file)[1:]]
    # frozen parameters (e.g. the DiT's fixed pos_embed): each rank's model file holds its partition
    frozen = {name: torch.cat([m["frozen_param_fragments"][name].reshape(-1) for m in models])[:math.prod(shape)]
              .float().view(shape) for name, shape in (model.get("frozen_param_shapes") or {}).items()}
    shapes = {k: v for group in model["param_shapes"] for k, v in group.items()}
    ranks = [_load(f)["optimizer_state_dict"] for f in _rank_files(folder, world, _optim_file)]
    flats = [torch.cat(list(r["fp32_flat_groups"])) for r in ranks]
    states = [r["optimizer_state_dict"]["state"] for r in ranks]
    n_sub = len(ranks[0]["fp32_flat_groups"])
    stepped = all(sg in states[0] for sg in range(n_sub))
    moments = {}
    full = FullState(3, world, frozen, buffers=_buffers(model["module"], model.get("buffer_names")),
                     **_counters(model))
    if stepped:
        s = states[0][0]["step"]
        full.step = s.clone() if torch.is_tensor(s) else torch.tensor(float(s))
        moments = {k: [torch.cat([st[sg][k] for sg in range(n_sub)]) for st in states]
                   for k in _moments_of(states[0][0])}
    offset = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part = math.ceil(numel / world)
        full.params[name] = torch.cat([f.narrow(0, offset, part) for f in flats])[:numel].float().view(shape)
        for key, per_rank in moments.items():
            full.moments.setdefault(key, {})[name] = torch.cat(
                [m.narrow(0, offset, part) for m in per_rank])[:numel].float().view(shape)
        offset += part
    if offset != flats[0].numel():
        raise ConfigError(f"{folder}: the parameters take {offset} elements per rank, the files hold "
                          f"{flats[0].numel()}")
    return full


# ----------------------------------------------------------------------------- into a new engine

def _step_state(step: torch.Tensor, moments: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"step": step.clone(), **moments}


def _check_names(engine: Any, full: FullState, where: str) -> dict[str, torch.nn.Parameter]:
    named = dict(engine.module.named_parameters())
    missing, unexpected = sorted(set(named) - set(full.params)), sorted(set(full.params) - set(named))
    if missing or unexpected:
        raise ConfigError(f"{where} does not fit this model: parameters missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}")
    return named


def load_full_state(engine: Any, optimizer: torch.optim.Optimizer, full: FullState, where: str = "checkpoint") -> None:
    """Write `full` into `engine` (built by deepspeed.initialize on `optimizer`, any ZeRO stage, any world size):
    the working weights, the fp32 masters, the optimizer's moments and step, the buffers and DeepSpeed's step
    counters. Every rank calls it (stage 3 gathers each parameter once)."""
    named = _check_names(engine, full, where)
    with torch.no_grad():
        for name, b in engine.module.named_buffers():
            if name in full.buffers:
                b.copy_(full.buffers[name])
        stage = engine.zero_optimization_stage()
        if stage == 0:
            _load_stage0(engine, optimizer, named, full)
        elif stage in (1, 2):
            _load_stage12(engine, named, full)
        else:
            _load_stage3(engine, named, full)
    engine.global_steps, engine.global_samples = full.global_steps, full.global_samples
    engine.skipped_steps = full.skipped_steps


def _load_stage0(engine: Any, optimizer: torch.optim.Optimizer, named: dict, full: FullState) -> None:
    for name, p in named.items():
        p.copy_(full.params[name])
    opt = engine.optimizer if isinstance(engine.optimizer, torch.optim.Optimizer) else optimizer
    if full.step is None:
        return
    name_of = {id(p): n for n, p in named.items()}
    sd = opt.state_dict()
    order = [p for g in opt.param_groups for p in g["params"]]
    sd["state"] = {i: _step_state(full.step, {k: full.moments[k][name_of[id(p)]] for k in full.moments})
                   for i, p in enumerate(order)
                   if all(name_of[id(p)] in m for m in full.moments.values())}  # (frozen ones have none)
    opt.load_state_dict(sd)  # (casts to each parameter's device; step where the optimizer keeps it)


def _load_stage12(engine: Any, named: dict, full: FullState) -> None:
    zero = engine.optimizer
    for name, p in named.items():  # the working weights: every rank holds them whole
        p.copy_(full.params[name])
    base = zero.optimizer
    index = {id(p): i for i, p in enumerate(p for g in base.param_groups for p in g["params"])}
    name_of = {id(p): n for n, p in named.items()}
    states = {}
    for g, flat in enumerate(zero.single_partition_of_fp32_groups):
        values = {"param": flat, **{k: torch.zeros_like(flat) for k in full.moments}}
        for p in zero.bit16_groups[g]:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:  # no element of this parameter in this rank's partition
                continue
            name = name_of[id(p)]
            lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
            sources = {"param": full.params[name], **{k: full.moments[k][name] for k in full.moments}}
            for key, dest in values.items():
                dest.narrow(0, hp.start, hp.numel).copy_(sources[key].reshape(-1).narrow(0, lp.start, lp.numel))
        if full.step is not None:
            states[index[id(flat)]] = _step_state(full.step, {k: v for k, v in values.items() if k != "param"})
    if full.step is not None:
        sd = base.state_dict()
        sd["state"] = states
        base.load_state_dict(sd)
        # each parameter's views of the new moments (what DeepSpeed's first step would link, and what
        # safe_get_full_optimizer_state reads)
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _load_stage3(engine: Any, named: dict, full: FullState) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state
    zero = engine.optimizer
    if full.step is not None:
        # the base optimizer's state of each sub-group's flat partition, created as DeepSpeed's own rigid load
        # does (its param groups hold the flats only while a state dict is made or read)
        zero._set_fp32_optimizer_param_groups()
        try:
            base = zero.optimizer
            sd = base.state_dict()
            order = [p for g in base.param_groups for p in g["params"]]
            sd["state"] = {i: _step_state(full.step, {k: torch.zeros_like(p) for k in full.moments})
                           for i, p in enumerate(order)}
            base.load_state_dict(sd)
        finally:
            zero._clear_fp32_optimizer_param_groups()
    for name, p in named.items():
        if not p.requires_grad:
            continue
        part = p.ds_tensor.ds_numel
        rank = dist.get_rank(group=getattr(p, "ds_process_group", None))

        def local(t: torch.Tensor) -> torch.Tensor:
            flat = t.reshape(-1)
            flat = torch.cat([flat, flat.new_zeros(part * dist.get_world_size(
                group=getattr(p, "ds_process_group", None)) - flat.numel())])
            return flat.narrow(0, part * rank, part)

        safe_set_local_fp32_param(p, local(full.params[name]))
        for key in full.moments if full.step is not None else ():
            safe_set_local_optimizer_state(p, local(full.moments[key][name]), key)
    items = list(named.items())
    for i in range(0, len(items), 64):  # the working (partitioned) weights, a group at a time
        group = items[i:i + 64]
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=0):
            if dist.get_rank() == 0:
                for name, p in group:
                    p.copy_(full.params[name])


def describe_moments(full: FullState) -> str:
    """A short fingerprint of the optimizer state (the start-up line of an elastic resume)."""
    if full.step is None:
        return "no optimizer state yet"
    norms = {k: math.sqrt(sum(float(v.double().square().sum()) for v in d.values())) for k, d in full.moments.items()}
    return f"Adam step {int(full.step)}, " + ", ".join(f"|{k}| {v:.4g}" for k, v in sorted(norms.items()))
