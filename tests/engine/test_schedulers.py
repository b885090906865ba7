"""gradmesh.core.optim.lr_scheduler against torch.optim.lr_scheduler: the same learning
rates (and OneCycle's momentum) at every step, bit for bit, and state_dict round trips."""

from __future__ import annotations

import pytest
import torch

import gradmesh.core as gm
from gradmesh.core.optim import lr_scheduler as ours_sched

STEPS = 30


def _pair(opt_name: str = "SGD", groups: int = 2, **opt_kwargs):
    """Optimizers over ``groups`` parameter groups (lrs 0.1, 0.05, ...) in both libraries."""

    def make(lib, param):
        params = [{"params": [param(lib)], "lr": 0.1 / (i + 1)} for i in range(groups)]
        return getattr(lib.optim, opt_name)(params, lr=0.1, **opt_kwargs)

    return (
        make(gm, lambda lib: gm.nn.Parameter(gm.zeros(2))),
        make(torch, lambda lib: torch.nn.Parameter(torch.zeros(2))),
    )


def _momenta(opt) -> list:
    return [g["betas"][0] if "betas" in g else g.get("momentum") for g in opt.param_groups]


def _trajectory(opt, sched, steps: int = STEPS, metric=None) -> list:
    out = [(sched.get_last_lr(), [g["lr"] for g in opt.param_groups], _momenta(opt))]
    for i in range(steps):
        opt.step()
        sched.step(metric(i)) if metric else sched.step()
        out.append((list(sched.get_last_lr()), [g["lr"] for g in opt.param_groups], _momenta(opt)))
    return out


def _single(name, **kw):
    def build(lib, opt):
        return getattr(lib.optim.lr_scheduler, name)(opt, **kw)

    return build


def _sequential(lib, opt):
    s = lib.optim.lr_scheduler
    return s.SequentialLR(
        opt,
        [
            s.LinearLR(opt, start_factor=0.1, total_iters=4),
            s.CosineAnnealingLR(opt, T_max=7, eta_min=1e-3),
            s.StepLR(opt, step_size=3, gamma=0.5),
        ],
        milestones=[5, 15],
    )


CASES = {
    "step": _single("StepLR", step_size=4, gamma=0.3),
    "multistep": _single("MultiStepLR", milestones=[3, 7, 7, 20], gamma=0.5),
    "exponential": _single("ExponentialLR", gamma=0.9),
    "cosine": _single("CosineAnnealingLR", T_max=8, eta_min=0.01),
    "lambda": _single("LambdaLR", lr_lambda=lambda e: 1.0 / (1 + e) ** 0.5),
    "linear": _single("LinearLR", start_factor=0.25, end_factor=0.9, total_iters=6),
    "onecycle": _single("OneCycleLR", max_lr=[1.0, 0.5], total_steps=STEPS + 1),
    "onecycle-3phase-linear": _single(
        "OneCycleLR",
        max_lr=0.8,
        total_steps=STEPS + 2,
        three_phase=True,
        anneal_strategy="linear",
        pct_start=0.25,
    ),
    "sequential": _sequential,
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
def test_learning_rates_match_torch_exactly(case, opt_name):
    ours, theirs = _pair(opt_name, momentum=0.9) if opt_name == "SGD" else _pair(opt_name)
    a = _trajectory(ours, CASES[case](gm, ours))
    b = _trajectory(theirs, CASES[case](torch, theirs))
    assert a == b
    assert len({tuple(lrs) for lrs, _, _ in a}) > 1  # the schedule did change the lr


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(
            mode="max",
            factor=0.5,
            patience=2,
            cooldown=2,
            threshold_mode="abs",
            threshold=0.01,
            min_lr=[0.02, 0.0],
        ),
    ],
)
def test_reduce_on_plateau_matches_torch(kwargs):
    ours, theirs = _pair()
    metric = [
        5,
        4,
        4,
        4,
        4.5,
        3,
        3,
        3,
        3,
        3,
        3,
        3,
        3,
        3,
        3,
        3,
        2,
        2,
        2,
        2,
        2,
        2,
        2,
        2,
        2,
        2,
        2,
        2,
        2,
        2,
    ]
    a = _trajectory(ours, ours_sched.ReduceLROnPlateau(ours, **kwargs), metric=metric.__getitem__)
    b = _trajectory(
        theirs,
        torch.optim.lr_scheduler.ReduceLROnPlateau(theirs, **kwargs),
        metric=metric.__getitem__,
    )
    assert a == b and a[-1][0] != a[0][0]


@pytest.mark.parametrize("case", ["step", "cosine", "onecycle", "sequential"])
def test_state_dict_resumes_the_sequence(case):
    ours, _ = _pair()
    sched = CASES[case](gm, ours)
    whole = _trajectory(ours, sched, 20)
    fresh, _ = _pair()
    resumed = CASES[case](gm, fresh)
    _trajectory(fresh, resumed, 10)
    saved = resumed.state_dict()
    fresh2, _ = _pair()
    again = CASES[case](gm, fresh2)
    fresh2.load_state_dict(fresh.state_dict())
    again.load_state_dict(saved)
    assert _trajectory(fresh2, again, 10)[1:] == whole[11:]


def test_errors_match_torch():
    ours, theirs = _pair()
    for lib, opt in ((gm, ours), (torch, theirs)):
        s = lib.optim.lr_scheduler
        with pytest.raises(ValueError, match="one more than the number of milestone"):
            s.SequentialLR(opt, [s.StepLR(opt, 2)], milestones=[3])
        with pytest.raises(ValueError, match="Factor should be < 1.0"):
            s.ReduceLROnPlateau(opt, factor=1.0)
        one = s.OneCycleLR(opt, max_lr=1.0, total_steps=2)
        opt.step()
        one.step()
        one.step()
        with pytest.raises(ValueError, match="Tried to step 3 times"):
            one.step()
