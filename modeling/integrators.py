"""The integrators of the rectified-flow sampler, one class each, in a registry keyed by `--method` name.

An integrator moves the state x from noise (t = 0) to data (t = 1) over a time grid, given the velocity
`v(x, t) -> dx/dt` (t a host float: guidance on / off is decided on the host, with no device synchronisation).
`sampling.sample` (the reference path) and `sampling.Sampler` (the fast path: precision, compile, CUDA graphs)
both look the method up here, so adding one is one class and one registration:

    from modeling.integrators import Integrator, register_integrator

    @register_integrator("midpoint")
    class Midpoint(Integrator):
        '''Explicit midpoint (RK2): two model calls per step.'''
        def step(self, v: Velocity, x: torch.Tensor, t0: float, t1: float, last: bool = False,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
            h = t1 - t0
            return x + h * v(x + 0.5 * h * v(x, t0), t0 + 0.5 * h)

After that, `SamplingConfig(method="midpoint")`, `Sampler`, `sample(method="midpoint")`, `--method midpoint`
of every sampling command and `eval.method: midpoint` accept it (docs/sampling.md has the worked example).

A fixed-grid integrator implements `step`; an adaptive one (dopri5) overrides `integrate`. Options an
integrator takes (dopri5's atol / rtol, Euler-Maruyama's diffusion_norm) are its constructor's keyword
arguments; `make_integrator` passes each integrator the ones it declares.
"""
import inspect
import math
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence

import torch

Velocity = Callable[[torch.Tensor, float], torch.Tensor]

INTEGRATORS: dict[str, type["Integrator"]] = {}


def register_integrator(name: str) -> Callable[[type["Integrator"]], type["Integrator"]]:
    """Class decorator: make `cls` the integrator of `--method name`. A second class under the same name
    replaces the first (so a test or a notebook can re-register)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"integrator name must be an identifier (it becomes a --method choice), got {name!r}")

    def deco(cls: type["Integrator"]) -> type["Integrator"]:
        if not (isinstance(cls, type) and issubclass(cls, Integrator)):
            raise TypeError(f"register_integrator({name!r}) needs an Integrator subclass, got {cls!r}")
        cls.name = name
        INTEGRATORS[name] = cls
        return cls
    return deco


def integrator_names() -> tuple[str, ...]:
    """The registered method names, in registration order (the built-ins first)."""
    return tuple(INTEGRATORS)


def make_integrator(method: str, **options: Any) -> "Integrator":
    """The registered integrator `method`, built with those of `options` its constructor declares (the others
    belong to other integrators: atol / rtol are dopri5's, diffusion_norm Euler-Maruyama's)."""
    if method not in INTEGRATORS:
        raise ValueError(f"unknown sampling method {method!r}; registered: {', '.join(INTEGRATORS)}")
    cls = INTEGRATORS[method]
    params = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in options.items() if k in params})


class Integrator:
    """Integrates dx/dt = v(x, t) over a time grid (host floats, increasing from 0 to 1)."""

    name: ClassVar[str] = ""
    # True only where `step(v, x, t0, t1)` is exactly x + (t1 - t0) * v(x, t0): one model call at a grid
    # time per step. The Sampler may then compile the model with static shapes and capture each step as a
    # CUDA graph (with its own copy of that update and t, dt as device tensors); everything else runs eagerly.
    capturable: ClassVar[bool] = False

    def step(self, v: Velocity, x: torch.Tensor, t0: float, t1: float, last: bool = False,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x at t1 from x at t0. `last`: this is the grid's final step; `generator`: for stochastic methods."""
        raise NotImplementedError(f"{type(self).__name__} implements neither step nor integrate")

    def integrate(self, v: Velocity, x: torch.Tensor, grid: Sequence[float],
                  generator: Optional[torch.Generator] = None, steps: Optional[Iterable[int]] = None,
                  trajectory: Optional[list] = None) -> torch.Tensor:
        """x at grid[-1] from x at grid[0]. steps: the step indices to run (default all; a progress bar may wrap
        them); trajectory: a list that receives the state after each step."""
        n = len(grid) - 1
        for i in range(n) if steps is None else steps:
            x = self.step(v, x, grid[i], grid[i + 1], last=i == n - 1, generator=generator)
            if trajectory is not None:
                trajectory.append(x)
        return x


@register_integrator("euler")
class Euler(Integrator):
    """x + dt * v(x, t0): one model call per step (the authors' sampler)."""

    capturable = True

    def step(self, v: Velocity, x: torch.Tensor, t0: float, t1: float, last: bool = False,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return x + (t1 - t0) * v(x, t0)


@register_integrator("heun")
class Heun(Integrator):
    """Heun's method (explicit trapezoid): two model calls per step, second order."""

    def step(self, v: Velocity, x: torch.Tensor, t0: float, t1: float, last: bool = False,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        dt = t1 - t0
        d0 = v(x, t0)
        x_pred = x + dt * d0
        return x + dt * 0.5 * (d0 + v(x_pred, t1))


@register_integrator("dopri5")
class Dopri5(Integrator):
    """Adaptive Dormand-Prince 5(4) from torchdiffeq: the grid only sets where the solution is reported; the
    solver picks its own steps to meet atol / rtol."""

    def __init__(self, atol: float = 1e-6, rtol: float = 1e-3) -> None:
        self.atol, self.rtol = atol, rtol

    def integrate(self, v: Velocity, x: torch.Tensor, grid: Sequence[float],
                  generator: Optional[torch.Generator] = None, steps: Optional[Iterable[int]] = None,
                  trajectory: Optional[list] = None) -> torch.Tensor:
        from torchdiffeq import odeint
        tgrid = torch.tensor(list(grid), device=x.device, dtype=torch.float32)
        # torchdiffeq evaluates at arbitrary t: guidance on / off is decided per evaluation (a host float).
        out = odeint(lambda t, x_: v(x_, float(t)), x, tgrid, method="dopri5", atol=self.atol, rtol=self.rtol)
        if trajectory is not None:
            trajectory.extend(out[1:])
        return out[-1]


@register_integrator("euler_maruyama")
class EulerMaruyama(Integrator):
    """The SDE with the ODE's marginals: dx = [v + 0.5 g^2 score] dt + g dW. For the linear path
    (x = t x1 + (1 - t) x0) the score is (t v - x) / (1 - t); g^2 = 2 * diffusion_norm * t * (1 - t) keeps the
    drift bounded at both ends. The last step is deterministic (lands on the mean, as SiT's "Mean")."""

    def __init__(self, diffusion_norm: float = 1.0) -> None:
        self.diffusion_norm = diffusion_norm

    def step(self, v: Velocity, x: torch.Tensor, t0: float, t1: float, last: bool = False,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        dt = t1 - t0
        vel = v(x, t0)
        if last:
            return x + dt * vel
        drift = vel + self.diffusion_norm * t0 * (t0 * vel - x)  # 0.5 g^2 * score
        g2 = 2 * self.diffusion_norm * t0 * (1 - t0)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + drift * dt + math.sqrt(g2 * dt) * noise
