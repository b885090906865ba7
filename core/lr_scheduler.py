"""Learning-rate schedules with ``torch.optim.lr_scheduler``'s sequences, step for step.

Each scheduler changes ``group["lr"]`` of its optimizer's parameter groups when stepped
(after ``optimizer.step()``), keeps ``get_last_lr()``, and saves and restores its position
with ``state_dict()``/``load_state_dict()`` (every attribute but the optimizer, as torch).
The formulas are torch's "chainable" ones (each lr computed from the previous one) and, for
``step(epoch)`` and ``SequentialLR``'s milestones, its closed forms.

>>> import gradmesh.core as gm
>>> opt = gm.optim.SGD([gm.nn.Parameter(gm.zeros(1))], lr=1.0)
>>> sched = gm.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
>>> lrs = []
>>> for _ in range(4):
...     opt.step(); sched.step(); lrs.append(sched.get_last_lr()[0])
>>> lrs
[1.0, 0.5, 0.5, 0.25]
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from typing import Any, Callable, Sequence

__all__ = [
    "LRScheduler",
    "LambdaLR",
    "StepLR",
    "MultiStepLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "LinearLR",
    "OneCycleLR",
    "SequentialLR",
    "ReduceLROnPlateau",
    "describe",
    "validate",
    "from_description",
    "ScheduleRunner",
]


class LRScheduler:
    """Base class: ``initial_lr`` in each group, ``base_lrs``, ``last_epoch`` and the first
    step, taken on construction as torch does."""

    def __init__(self, optimizer, last_epoch: int = -1):
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(
                        f"param 'initial_lr' is not specified in param_groups[{i}] "
                        f"when resuming scheduler with last_epoch >= 0"
                    )
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._initial_step()

    def _initial_step(self) -> None:
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def get_lr(self) -> list[float]:
        """The next learning rates from the current ones (torch's chainable form)."""
        raise NotImplementedError

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def _lrs(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self, epoch: int | None = None) -> None:
        self._step_count += 1
        self._update_lr(epoch)

    def _update_lr(self, epoch: int | None = None) -> None:
        if epoch is None:
            self.last_epoch += 1
            values = self.get_lr()
        else:
            self.last_epoch = epoch
            closed = getattr(self, "_closed_form_lr", None)
            values = closed() if closed is not None else self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = self._lrs()

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)


class LambdaLR(LRScheduler):
    """``lr = base_lr * lr_lambda(epoch)``; one function, or one per group. Functions are
    left out of ``state_dict`` (torch keeps only callable objects' ``__dict__``)."""

    def __init__(self, optimizer, lr_lambda: Callable | Sequence[Callable], last_epoch: int = -1):
        n = len(optimizer.param_groups)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise ValueError(f"Expected {n} lr_lambdas, but got {len(lr_lambda)}")
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * n
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [base * f(self.last_epoch) for f, base in zip(self.lr_lambdas, self.base_lrs)]

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        state["lr_lambdas"] = [None] * len(self.lr_lambdas)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = {k: v for k, v in state_dict.items() if k != "lr_lambdas"}
        self.__dict__.update(state)


class StepLR(LRScheduler):
    """Multiply the lr by ``gamma`` every ``step_size`` epochs."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1):
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._lrs()
        return [lr * self.gamma for lr in self._lrs()]

    def _closed_form_lr(self) -> list[float]:
        return [base * self.gamma ** (self.last_epoch // self.step_size) for base in self.base_lrs]


class MultiStepLR(LRScheduler):
    """Multiply the lr by ``gamma`` at each milestone (a milestone listed twice: twice)."""

    def __init__(
        self, optimizer, milestones: Sequence[int], gamma: float = 0.1, last_epoch: int = -1
    ):
        self.milestones, self.gamma = Counter(milestones), gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch not in self.milestones:
            return self._lrs()
        return [lr * self.gamma ** self.milestones[self.last_epoch] for lr in self._lrs()]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A state that went through JSON has its milestones' keys as strings.
        state = dict(state_dict)
        state["milestones"] = Counter({int(k): v for k, v in state["milestones"].items()})
        self.__dict__.update(state)

    def _closed_form_lr(self) -> list[float]:
        milestones = sorted(self.milestones.elements())
        return [
            base * self.gamma ** bisect_right(milestones, self.last_epoch) for base in self.base_lrs
        ]


class ExponentialLR(LRScheduler):
    """Multiply the lr by ``gamma`` every epoch."""

    def __init__(self, optimizer, gamma: float, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch == 0:
            return self._lrs()
        return [lr * self.gamma for lr in self._lrs()]

    def _closed_form_lr(self) -> list[float]:
        return [base * self.gamma**self.last_epoch for base in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """Cosine from the base lr down to ``eta_min`` over ``T_max`` epochs (and back up)."""

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1):
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        e, t, lo = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return self._lrs()
        if self._step_count == 1 and e > 0:
            return [
                lo + (base - lo) * (1 + math.cos(e * math.pi / t)) / 2 for base in self.base_lrs
            ]
        if (e - 1 - t) % (2 * t) == 0:
            return [
                lr + (base - lo) * (1 - math.cos(math.pi / t)) / 2
                for base, lr in zip(self.base_lrs, self._lrs())
            ]
        return [
            (1 + math.cos(math.pi * e / t)) / (1 + math.cos(math.pi * (e - 1) / t)) * (lr - lo) + lo
            for lr in self._lrs()
        ]

    def _closed_form_lr(self) -> list[float]:
        lo = self.eta_min
        return [
            lo + (base - lo) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
            for base in self.base_lrs
        ]


class LinearLR(LRScheduler):
    """Scale the lr linearly from ``start_factor`` to ``end_factor`` over ``total_iters``."""

    def __init__(
        self,
        optimizer,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = -1,
    ):
        if not 0 < start_factor <= 1:
            raise ValueError(
                "Starting multiplicative factor expected to be greater than 0 "
                "and less or equal to 1."
            )
        if not 0 <= end_factor <= 1:
            raise ValueError("Ending multiplicative factor expected to be between 0 and 1.")
        self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        s, f, n = self.start_factor, self.end_factor, self.total_iters
        if self.last_epoch == 0:
            return [lr * s for lr in self._lrs()]
        if self._is_initial or self.last_epoch > n:
            return self._lrs()
        return [
            lr * (1.0 + (f - s) / (n * s + (self.last_epoch - 1) * (f - s))) for lr in self._lrs()
        ]

    def _closed_form_lr(self) -> list[float]:
        s, f, n = self.start_factor, self.end_factor, self.total_iters
        return [base * (s + (f - s) * min(n, self.last_epoch) / n) for base in self.base_lrs]


class OneCycleLR(LRScheduler):
    """The 1cycle policy: lr up to ``max_lr`` then down (and momentum the other way)."""

    def __init__(
        self,
        optimizer,
        max_lr: float | Sequence[float],
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        cycle_momentum: bool = True,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ):
        self.total_steps = _total_steps(total_steps, epochs, steps_per_epoch)
        # The arguments, as a job's description of this schedule carries them.
        self._arguments = {
            "max_lr": max_lr,
            "total_steps": self.total_steps,
            "pct_start": pct_start,
            "anneal_strategy": anneal_strategy,
            "cycle_momentum": cycle_momentum,
            "base_momentum": base_momentum,
            "max_momentum": max_momentum,
            "div_factor": div_factor,
            "final_div_factor": final_div_factor,
            "three_phase": three_phase,
        }
        if not isinstance(pct_start, float) or not 0 <= pct_start <= 1:
            raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}"
            )
        self.anneal_strategy = anneal_strategy
        self._schedule_phases = _one_cycle_phases(self.total_steps, pct_start, three_phase)
        groups = optimizer.param_groups
        if last_epoch == -1:
            for group, top in zip(groups, _per_group("max_lr", groups, max_lr)):
                group["initial_lr"] = top / div_factor
                group["max_lr"] = top
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
                raise ValueError(
                    "optimizer must support momentum or beta1 with `cycle_momentum` option enabled"
                )
            self.use_beta1 = "betas" in optimizer.defaults
            if last_epoch == -1:
                for group, hi, lo in zip(
                    groups,
                    _per_group("max_momentum", groups, max_momentum),
                    _per_group("base_momentum", groups, base_momentum),
                ):
                    self._set_momentum(group, hi)
                    group["max_momentum"], group["base_momentum"] = hi, lo
        super().__init__(optimizer, last_epoch)

    def _set_momentum(self, group: dict, value: float) -> None:
        if self.use_beta1:
            group["betas"] = (value, *group["betas"][1:])
        else:
            group["momentum"] = value

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(
                f"Tried to step {step} times. The specified number of total "
                f"steps is {self.total_steps}"
            )
        lrs = []
        for group in self.optimizer.param_groups:
            start_step = 0.0
            for i, phase in enumerate(self._schedule_phases):
                end_step = phase["end_step"]
                if step <= end_step or i == len(self._schedule_phases) - 1:
                    pct = (step - start_step) / (end_step - start_step)
                    lrs.append(self._anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct))
                    if self.cycle_momentum:
                        self._set_momentum(
                            group,
                            self._anneal(
                                group[phase["start_momentum"]], group[phase["end_momentum"]], pct
                            ),
                        )
                    break
                start_step = end_step
        return lrs


def _total_steps(total_steps, epochs, steps_per_epoch) -> int:
    if total_steps is not None:
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
        return total_steps
    if epochs is not None and steps_per_epoch is not None:
        for name, n in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
            if not isinstance(n, int) or n <= 0:
                raise ValueError(f"Expected positive integer {name}, but got {n}")
        return epochs * steps_per_epoch
    raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")


def _one_cycle_phases(total: int, pct_start: float, three_phase: bool) -> list[dict]:
    def phase(end_step, lr_from, lr_to, m_from, m_to) -> dict:
        return {
            "end_step": end_step,
            "start_lr": lr_from,
            "end_lr": lr_to,
            "start_momentum": m_from,
            "end_momentum": m_to,
        }

    up = phase(
        float(pct_start * total) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"
    )
    if not three_phase:
        return [up, phase(total - 1, "max_lr", "min_lr", "base_momentum", "max_momentum")]
    return [
        up,
        phase(
            float(2 * pct_start * total) - 2,
            "max_lr",
            "initial_lr",
            "base_momentum",
            "max_momentum",
        ),
        phase(total - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum"),
    ]


def _per_group(name: str, groups: list, value) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise ValueError(f"expected {len(groups)} values for {name}, got {len(value)}")
        return list(value)
    return [value] * len(groups)


class SequentialLR(LRScheduler):
    """Run ``schedulers`` one after another, switching at each of ``milestones``."""

    def __init__(
        self,
        optimizer,
        schedulers: Sequence[LRScheduler],
        milestones: Sequence[int],
        last_epoch: int = -1,
    ):
        if len(schedulers) < 1:
            raise ValueError("SequentialLR expects at least one scheduler, but got no scheduler.")
        for i, s in enumerate(schedulers):
            if isinstance(s, ReduceLROnPlateau):
                raise ValueError(
                    f"SequentialLR does not support `ReduceLROnPlateau` scheduler "
                    f"as it requires additional kwargs to be specified when "
                    f"calling `step`, but got one at index {i} in the given "
                    f"schedulers sequence."
                )
            if s.optimizer is not optimizer:
                raise ValueError(
                    f"SequentialLR expects all schedulers to belong to the same "
                    f"optimizer, but got scheduler {type(s).__name__} at index "
                    f"{i} with a different one"
                )
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(
                f"Sequential Schedulers expects number of schedulers provided to "
                f"be one more than the number of milestone points, but got "
                f"number of schedulers {len(schedulers)} and the number of "
                f"milestones to be equal to {len(milestones)}"
            )
        self._schedulers, self._milestones = list(schedulers), list(milestones)
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        for s in self._schedulers:  # undo the step each took when it was made
            s.last_epoch -= 1
        first = self._schedulers[bisect_right(self._milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    def step(self) -> None:  # type: ignore[override]
        self.last_epoch += 1
        idx = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[idx]
        if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_schedulers")}
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "_schedulers"})
        for s, saved in zip(self._schedulers, state_dict["_schedulers"]):
            s.load_state_dict(saved)


class ReduceLROnPlateau(LRScheduler):
    """Multiply the lr by ``factor`` once a metric stopped improving for ``patience`` epochs."""

    def __init__(
        self,
        optimizer,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float | Sequence[float] = 0,
        eps: float = 1e-8,
    ):
        if factor >= 1.0:
            raise ValueError("Factor should be < 1.0.")
        if mode not in ("min", "max"):
            raise ValueError(f"mode {mode} is unknown!")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold mode {threshold_mode} is unknown!")
        self.optimizer = optimizer
        self.factor, self.patience, self.cooldown, self.eps = factor, patience, cooldown, eps
        self.min_lrs = _per_group("min_lr", optimizer.param_groups, min_lr)
        self.mode, self.threshold, self.threshold_mode = mode, threshold, threshold_mode
        self.last_epoch = 0
        self._last_lr = self._lrs()
        self.best = math.inf if mode == "min" else -math.inf
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def step(self, metrics, epoch: int | None = None) -> None:  # type: ignore[override]
        current = float(metrics)
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        if self._is_better(current):
            self.best, self.num_bad_epochs = current, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs in cooldown do not count
        if self.num_bad_epochs > self.patience:
            for group, floor in zip(self.optimizer.param_groups, self.min_lrs):
                new_lr = max(float(group["lr"]) * self.factor, floor)
                if float(group["lr"]) - new_lr > self.eps:
                    group["lr"] = new_lr
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0
        self._last_lr = self._lrs()

    def _is_better(self, a: float) -> bool:
        rel = self.threshold_mode == "rel"
        if self.mode == "min":
            return a < self.best * (1.0 - self.threshold) if rel else a < self.best - self.threshold
        return a > self.best * (1.0 + self.threshold) if rel else a > self.best + self.threshold


# ==================================================================== schedules as data ==
#
# A training job's schedule crosses the network as a description (plain data, no code):
# ``{"name": "StepLR", "step_size": 30, "gamma": 0.1}``, SequentialLR with its children's
# descriptions. The coordinator rebuilds the very scheduler classes above from it
# (``ScheduleRunner``), so a job's learning rates are the floats local training gets.

# Every argument each describable schedule takes, with torch's defaults (None: required).
SCHEDULE_ARGUMENTS: dict[str, dict[str, Any]] = {
    "StepLR": {"step_size": None, "gamma": 0.1},
    "MultiStepLR": {"milestones": None, "gamma": 0.1},
    "ExponentialLR": {"gamma": None},
    "CosineAnnealingLR": {"T_max": None, "eta_min": 0.0},
    "LinearLR": {"start_factor": 1.0 / 3, "end_factor": 1.0, "total_iters": 5},
    "OneCycleLR": {
        "max_lr": None,
        "total_steps": None,
        "pct_start": 0.3,
        "anneal_strategy": "cos",
        "cycle_momentum": True,
        "base_momentum": 0.85,
        "max_momentum": 0.95,
        "div_factor": 25.0,
        "final_div_factor": 1e4,
        "three_phase": False,
    },
    "SequentialLR": {"schedulers": None, "milestones": None},
    "ReduceLROnPlateau": {
        "mode": "min",
        "factor": 0.1,
        "patience": 10,
        "threshold": 1e-4,
        "threshold_mode": "rel",
        "cooldown": 0,
        "min_lr": 0.0,
        "eps": 1e-8,
    },
}
# Schedules that run the user's code: a description cannot carry them.
_CODE_SCHEDULES = ("LambdaLR", "MultiplicativeLR")
_INTS = ("step_size", "T_max", "total_iters", "total_steps", "patience", "cooldown")
_BOOLS = ("cycle_momentum", "three_phase")
_CHOICES = {
    "anneal_strategy": ("cos", "linear"),
    "mode": ("min", "max"),
    "threshold_mode": ("rel", "abs"),
}


def describe(scheduler) -> dict:
    """The scheduler as a plain, JSON-ready description (``validate``'s form).

    >>> import gradmesh.core as gm
    >>> opt = gm.optim.SGD([gm.nn.Parameter(gm.zeros(1))], lr=1.0)
    >>> describe(gm.optim.lr_scheduler.StepLR(opt, step_size=2))
    {'name': 'StepLR', 'step_size': 2, 'gamma': 0.1}
    """
    if scheduler.last_epoch != 0:
        raise ValueError(
            f"describe: {type(scheduler).__name__} has been stepped "
            f"{scheduler.last_epoch} times; a job's schedule starts at its first step, so "
            f"describe a fresh scheduler"
        )
    return validate(_description_of(scheduler))


def _description_of(s) -> dict:
    """A scheduler's name and constructor arguments (its children's, for SequentialLR)."""
    name = type(s).__name__
    if name in _CODE_SCHEDULES:
        raise ValueError(_code_message(name))
    if name not in SCHEDULE_ARGUMENTS:
        raise ValueError(f"cannot describe {name}: not one of {sorted(SCHEDULE_ARGUMENTS)}")
    if name == "OneCycleLR":
        args = {k: _one_value(k, v) for k, v in s._arguments.items()}
    elif name == "SequentialLR":
        args = {
            "schedulers": [_description_of(c) for c in s._schedulers],
            "milestones": list(s._milestones),
        }
    elif name == "MultiStepLR":
        args = {"milestones": sorted(s.milestones.elements()), "gamma": s.gamma}
    elif name == "ReduceLROnPlateau":
        args = {k: getattr(s, k) for k in SCHEDULE_ARGUMENTS[name] if k != "min_lr"}
        args["min_lr"] = _one_value("min_lr", s.min_lrs)
    else:
        args = {k: getattr(s, k) for k in SCHEDULE_ARGUMENTS[name]}
    return {"name": name, **args}


def _one_value(key: str, value):
    """A per-group argument given as a list: a description carries one value."""
    if isinstance(value, (list, tuple)):
        if any(v != value[0] for v in value[1:]):
            raise ValueError(
                f"describe: {key} differs between parameter groups ({list(value)}); a "
                f"job has one group, so give one value"
            )
        return value[0]
    return value


def _code_message(name: str) -> str:
    return (
        f"{name} runs a Python function each step; a job's schedule is data (no code "
        f"crosses the network), so use one of {sorted(SCHEDULE_ARGUMENTS)} "
        f"(SequentialLR chains them)"
    )


def validate(description: dict, path: str = "schedule") -> dict:
    """Check a schedule description received over the network; return it complete
    (defaults filled in, plain JSON types). Problems raise ``ValueError`` naming the
    argument (``path`` prefixes it: ``schedule.schedulers[1].gamma``).

    >>> validate({"name": "ExponentialLR", "gamma": 0.9})
    {'name': 'ExponentialLR', 'gamma': 0.9}
    """
    if not isinstance(description, dict):
        raise ValueError(
            f"{path}: a schedule description must be a dict, got {type(description).__name__}"
        )
    name = description.get("name")
    if name in _CODE_SCHEDULES:
        raise ValueError(f"{path}: {_code_message(name)}")
    if name not in SCHEDULE_ARGUMENTS:
        raise ValueError(
            f"{path}.name: unknown schedule {name!r}; expected one of {sorted(SCHEDULE_ARGUMENTS)}"
        )
    defaults = SCHEDULE_ARGUMENTS[name]
    unknown = sorted(set(description) - set(defaults) - {"name"})
    if unknown:
        raise ValueError(f"{path}: {name} takes no {unknown}; it takes {sorted(defaults)}")
    out: dict[str, Any] = {"name": name}
    for key, default in defaults.items():
        value = description.get(key, default)
        if value is None:
            raise ValueError(f"{path}.{key}: {name} needs {key}")
        out[key] = _check_argument(f"{path}.{key}", key, value)
    _check_schedule(name, out, path)
    return out


def _check_argument(where: str, key: str, value):
    if key == "schedulers":
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{where}: SequentialLR needs a non-empty list of schedules")
        return [validate(child, f"{where}[{i}]") for i, child in enumerate(value)]
    if key == "milestones":
        if not isinstance(value, (list, tuple)) or not all(_is_int(m) and m >= 0 for m in value):
            raise ValueError(f"{where}: must be a list of integers >= 0, got {value!r}")
        return [int(m) for m in value]
    if key in _INTS:
        if not _is_int(value) or value < (0 if key in ("patience", "cooldown") else 1):
            low = 0 if key in ("patience", "cooldown") else 1
            raise ValueError(f"{where}: must be an integer >= {low}, got {value!r}")
        return int(value)
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be a bool, got {value!r}")
        return value
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise ValueError(f"{where}: must be one of {list(_CHOICES[key])}, got {value!r}")
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{where}: must be a finite number, got {value!r}")
    return float(value)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Ranges torch checks when the scheduler is built (or that would divide by zero later).
_RANGES = {
    ("LinearLR", "start_factor"): (lambda v: 0 < v <= 1, "in (0, 1]"),
    ("LinearLR", "end_factor"): (lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("OneCycleLR", "pct_start"): (lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("OneCycleLR", "max_lr"): (lambda v: v >= 0, ">= 0"),
    ("OneCycleLR", "div_factor"): (lambda v: v > 0, "> 0"),
    ("OneCycleLR", "final_div_factor"): (lambda v: v > 0, "> 0"),
    # The momenta become SGD's momentum or Adam's beta1 on the shards, which take [0, 1).
    ("OneCycleLR", "base_momentum"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("OneCycleLR", "max_momentum"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("ReduceLROnPlateau", "factor"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("ReduceLROnPlateau", "min_lr"): (lambda v: v >= 0, ">= 0"),
    ("CosineAnnealingLR", "eta_min"): (lambda v: v >= 0, ">= 0"),
}


def _check_schedule(name: str, d: dict, path: str) -> None:
    for (owner, key), (ok, what) in _RANGES.items():
        if owner == name and not ok(d[key]):
            raise ValueError(f"{path}.{key}: must be {what}, got {d[key]}")
    if name == "OneCycleLR":
        phases = 3 if d["three_phase"] else 2
        if d["total_steps"] < phases:
            raise ValueError(
                f"{path}.total_steps: OneCycleLR needs at least {phases} steps, got "
                f"{d['total_steps']}"
            )
    if name == "SequentialLR":
        for i, child in enumerate(d["schedulers"]):
            if child["name"] in ("SequentialLR", "ReduceLROnPlateau"):
                raise ValueError(
                    f"{path}.schedulers[{i}]: SequentialLR cannot chain {child['name']}"
                )
        if len(d["milestones"]) != len(d["schedulers"]) - 1:
            raise ValueError(
                f"{path}.milestones: SequentialLR needs one milestone fewer than "
                f"schedules ({len(d['schedulers'])} schedules, {len(d['milestones'])} "
                f"milestones)"
            )
        if d["milestones"] != sorted(d["milestones"]):
            raise ValueError(f"{path}.milestones: must be in order, got {d['milestones']}")


_CLASSES = {
    "StepLR": StepLR,
    "MultiStepLR": MultiStepLR,
    "ExponentialLR": ExponentialLR,
    "CosineAnnealingLR": CosineAnnealingLR,
    "LinearLR": LinearLR,
    "OneCycleLR": OneCycleLR,
    "ReduceLROnPlateau": ReduceLROnPlateau,
}


def from_description(optimizer, description: dict) -> LRScheduler:
    """Build the scheduler a (validated) description names over ``optimizer``."""
    d = validate(description)
    name = d.pop("name")
    if name == "SequentialLR":
        children = [from_description(optimizer, c) for c in d["schedulers"]]
        return SequentialLR(optimizer, children, d["milestones"])
    return _CLASSES[name](optimizer, **d)


class ScheduleRunner:
    """A described schedule driven over a stand-in for the job's optimizer (one group,
    the job's hyper-parameters): the coordinator's side of a job's schedule.

    ``hyper()`` is what the next step applies (``lr``, and ``momentum``/``betas`` that
    OneCycleLR cycles); ``advance(loss)`` steps the scheduler after a step, with the step's
    loss as ReduceLROnPlateau's metric. ``state()`` is plain data (JSON) to checkpoint.

    >>> run = ScheduleRunner({"name": "sgd", "lr": 1.0}, {"name": "StepLR", "step_size": 1})
    >>> run.hyper()["lr"]; run.advance(0.5); run.hyper()["lr"]
    1.0
    0.1
    """

    def __init__(self, optimizer: dict, schedule: dict, state: dict | None = None):
        from .factories import zeros
        from .nn import Parameter
        from .optim import from_description as optimizer_from_description

        self.optimizer = optimizer_from_description([Parameter(zeros(0))], optimizer)
        self.scheduler = from_description(self.optimizer, schedule)
        self.steps = 0  # advance() calls so far: the next step is steps + 1
        if state is not None:
            self.load(state)

    def hyper(self) -> dict:
        group = self.optimizer.param_groups[0]
        out = {"lr": float(group["lr"])}
        if "momentum" in group:
            out["momentum"] = float(group["momentum"])
        if "betas" in group:
            out["betas"] = [float(b) for b in group["betas"]]
        return out

    def advance(self, loss: float) -> None:
        if isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step(loss)
        else:
            self.scheduler.step()
        self.steps += 1

    def state(self) -> dict:
        group = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in self.optimizer.param_groups[0].items()
            if k != "params"
        }
        return {"steps": self.steps, "group": group, "scheduler": self.scheduler.state_dict()}

    def load(self, state: dict) -> None:
        group = self.optimizer.param_groups[0]
        for k, v in state["group"].items():
            group[k] = tuple(v) if k == "betas" else v
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = int(state["steps"])
