"""Schedules as data: ``lr_scheduler.describe``/``validate``/``ScheduleRunner`` give a job's
coordinator torch's learning rates (and OneCycleLR's momentum) bit for bit, across a JSON
round trip of the runner's state; what cannot be data is refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch

import gradmesh.core as gm
from gradmesh.core import optim
from gradmesh.core.nn import utils as nn_utils
from gradmesh.core.optim import lr_scheduler as sched

STEPS = 30


def _single(name, **kw):
    return lambda lib, opt: getattr(lib.optim.lr_scheduler, name)(opt, **kw)


def _sequential(lib, opt):
    s = lib.optim.lr_scheduler
    return s.SequentialLR(
        opt,
        [
            s.LinearLR(opt, start_factor=0.1, total_iters=4),
            s.MultiStepLR(opt, milestones=[2, 4, 4], gamma=0.5),
            s.CosineAnnealingLR(opt, T_max=7, eta_min=1e-3),
        ],
        milestones=[5, 15],
    )


CASES = {
    "step": _single("StepLR", step_size=4, gamma=0.3),
    "multistep": _single("MultiStepLR", milestones=[3, 7, 7, 20], gamma=0.5),
    "exponential": _single("ExponentialLR", gamma=0.9),
    "cosine": _single("CosineAnnealingLR", T_max=8, eta_min=0.01),
    "linear": _single("LinearLR", start_factor=0.25, end_factor=0.9, total_iters=6),
    "onecycle": _single("OneCycleLR", max_lr=1.0, total_steps=STEPS + 1),
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


def _optimizers(name):
    kwargs = {"momentum": 0.9} if name == "SGD" else {}
    ours = getattr(gm.optim, name)([gm.nn.Parameter(gm.zeros(2))], lr=0.1, **kwargs)
    theirs = getattr(torch.optim, name)([torch.nn.Parameter(torch.zeros(2))], lr=0.1, **kwargs)
    return ours, theirs


def _torch_hyper(opt) -> dict:
    group = opt.param_groups[0]
    out = {"lr": group["lr"]}
    if "momentum" in group:
        out["momentum"] = group["momentum"]
    if "betas" in group:
        out["betas"] = list(group["betas"])
    return out


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("opt_name", ["SGD", "NAdam"])
def test_a_described_schedule_runs_torchs_sequence_across_a_json_restore(case, opt_name):
    ours, theirs = _optimizers(opt_name)
    local = CASES[case](gm, ours)
    reference = CASES[case](torch, theirs)
    description = json.loads(json.dumps(sched.describe(local)))
    assert sched.validate(description) == description
    runner = sched.ScheduleRunner(optim.describe(ours, initial=True), description)
    seen, expected = [], []
    for step in range(STEPS):
        seen.append(runner.hyper())
        expected.append(_torch_hyper(theirs))
        if step == 10:  # the coordinator restarts from its checkpoint
            state = json.loads(json.dumps(runner.state()))
            runner = sched.ScheduleRunner(optim.describe(ours, initial=True), description, state)
        theirs.step()
        reference.step()
        runner.advance(0.0)
    assert seen == expected
    assert len({h["lr"] for h in seen}) > 1


def test_reduce_on_plateau_runs_on_the_losses_given():
    ours, theirs = _optimizers("SGD")
    kwargs = dict(mode="max", factor=0.5, patience=1, cooldown=1, threshold_mode="abs")
    description = sched.describe(sched.ReduceLROnPlateau(ours, **kwargs))
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(theirs, **kwargs)
    runner = sched.ScheduleRunner(optim.describe(ours), description)
    losses = [5.0, 4.0, 4.0, 6.0, 3.0, 3.0, 2.0, 7.0, 1.0, 1.0, 1.0, 1.0]
    lrs = []
    for i, loss in enumerate(losses):
        assert runner.hyper()["lr"] == theirs.param_groups[0]["lr"]
        lrs.append(runner.hyper()["lr"])
        if i == 5:
            runner = sched.ScheduleRunner(
                optim.describe(ours), description, json.loads(json.dumps(runner.state()))
            )
        reference.step(loss)
        runner.advance(loss)
    assert len(set(lrs)) > 2


def test_what_is_code_or_not_fresh_is_refused_with_the_reason():
    opt, _ = _optimizers("SGD")
    with pytest.raises(ValueError, match="LambdaLR runs a Python function.*no code"):
        sched.describe(sched.LambdaLR(opt, lambda e: 1.0))
    with pytest.raises(ValueError, match="MultiplicativeLR runs a Python function"):
        sched.validate({"name": "MultiplicativeLR"})
    stepped = sched.StepLR(opt, step_size=2)
    opt.step()
    stepped.step()
    with pytest.raises(ValueError, match="stepped 1 times.*fresh"):
        sched.describe(stepped)
    two = gm.optim.SGD(
        [{"params": [gm.nn.Parameter(gm.zeros(1))]}, {"params": [gm.nn.Parameter(gm.zeros(1))]}],
        lr=0.1,
        momentum=0.9,
    )
    with pytest.raises(ValueError, match="max_lr differs between parameter groups"):
        sched.describe(sched.OneCycleLR(two, max_lr=[1.0, 0.5], total_steps=10))


@pytest.mark.parametrize(
    "description,match",
    [
        ({"name": "StepLR"}, r"^schedule.step_size: StepLR needs step_size"),
        ({"name": "StepLR", "step_size": 2.5}, r"^schedule.step_size: must be an integer >= 1"),
        ({"name": "StepLR", "step_size": 2, "gamma": "x"}, r"^schedule.gamma: must be a finite"),
        ({"name": "StepLR", "step_size": 2, "lr": 1}, r"^schedule: StepLR takes no \['lr'\]"),
        ({"name": "CosineAnnealingLR", "T_max": 0}, r"^schedule.T_max: must be an integer >= 1"),
        ({"name": "LinearLR", "end_factor": 2.0}, r"^schedule.end_factor: must be in \[0, 1\]"),
        (
            {"name": "OneCycleLR", "max_lr": 1.0, "total_steps": 5, "anneal_strategy": "x"},
            r"^schedule.anneal_strategy: must be one of \['cos', 'linear'\]",
        ),
        (
            {"name": "OneCycleLR", "max_lr": 1.0, "total_steps": 2, "three_phase": True},
            r"^schedule.total_steps: OneCycleLR needs at least 3",
        ),
        ({"name": "ReduceLROnPlateau", "factor": 1.0}, r"^schedule.factor: must be in \[0, 1\)"),
        ({"name": "ReduceLROnPlateau", "patience": -1}, r"^schedule.patience: must be an integer"),
        (
            {
                "name": "SequentialLR",
                "schedulers": [{"name": "StepLR", "step_size": 1}] * 2,
                "milestones": [],
            },
            r"^schedule.milestones: SequentialLR needs one milestone fewer",
        ),
        (
            {
                "name": "SequentialLR",
                "schedulers": [{"name": "ReduceLROnPlateau"}],
                "milestones": [],
            },
            r"^schedule.schedulers\[0\]: SequentialLR cannot chain ReduceLROnPlateau",
        ),
        (
            {"name": "SequentialLR", "schedulers": [{"name": "ExponentialLR"}], "milestones": []},
            r"^schedule.schedulers\[0\].gamma: ExponentialLR needs gamma",
        ),
        ({"name": "ExponentialLR", "gamma": float("nan")}, r"^schedule.gamma: must be a finite"),
        ("StepLR", r"^schedule: a schedule description must be a dict"),
    ],
)
def test_validate_names_the_argument(description, match):
    with pytest.raises(ValueError, match=match):
        sched.validate(description)


@pytest.mark.parametrize(
    "description,match",
    [
        ({"kind": "norm"}, r"^clipping.max_norm: clipping by norm needs max_norm"),
        ({"kind": "norm", "max_norm": -1.0}, r"^clipping.max_norm: must be a finite number >= 0"),
        ({"kind": "norm", "max_norm": 1.0, "norm_type": float("nan")}, "^clipping.norm_type"),
        ({"kind": "norm", "max_norm": 1.0, "error_if_nonfinite": 1}, "must be a bool"),
        ({"kind": "value", "clip_value": 0}, r"^clipping.clip_value: must be > 0"),
        ({"kind": "value", "clip_value": 1, "max_norm": 1}, r"takes no \['max_norm'\]"),
        ({"kind": "both"}, r"^clipping.kind: must be 'norm' or 'value'"),
    ],
)
def test_clipping_descriptions_name_the_field(description, match):
    with pytest.raises(ValueError, match=match):
        nn_utils.validate_clipping(description)


def test_clipping_descriptions_fill_torchs_defaults_and_take_inf():
    assert nn_utils.validate_clipping({"kind": "norm", "max_norm": 2, "norm_type": "inf"}) == {
        "kind": "norm",
        "max_norm": 2.0,
        "norm_type": float("inf"),
        "error_if_nonfinite": False,
    }
