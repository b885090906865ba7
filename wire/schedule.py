"""A job's learning-rate schedule and gradient clipping as messages (coordinator.proto's
``LRSchedule`` and ``GradientClipping``), to and from the plain descriptions of
:mod:`gradmesh.core.lr_scheduler` and :mod:`gradmesh.core.nn.utils`.

Each schedule message is named after its torch class and its fields after the class's
arguments, so the conversion walks the descriptors: a field added to a message and to
``SCHEDULE_ARGUMENTS`` needs no code here.

>>> msg = schedule_to_proto({"name": "StepLR", "step_size": 3})
>>> msg.WhichOneof("kind"), msg.step.gamma
('step', 0.1)
>>> schedule_from_proto(msg)
{'name': 'StepLR', 'step_size': 3, 'gamma': 0.1}
"""

from __future__ import annotations

from gradmesh.core import lr_scheduler
from gradmesh.core.nn import utils as nn_utils
from gradmesh.core.serialize import WireError
from gradmesh.v1 import coordinator_pb2

__all__ = ["schedule_to_proto", "schedule_from_proto", "clipping_to_proto", "clipping_from_proto"]

_KINDS = {
    f.message_type.name: f.name
    for f in coordinator_pb2.LRSchedule.DESCRIPTOR.oneofs_by_name["kind"].fields
}


def _fields_of(sub) -> dict:
    """The set fields of a schedule or clipping message as a dict (repeated: always)."""
    out: dict = {}
    for fd in sub.DESCRIPTOR.fields:
        value = getattr(sub, fd.name)
        if fd.is_repeated:
            if fd.name == "schedulers":
                out[fd.name] = [_schedule_dict(child) for child in value]
            else:
                out[fd.name] = list(value)
        elif sub.HasField(fd.name):
            out[fd.name] = value
    return out


def _schedule_dict(msg) -> dict:
    kind = msg.WhichOneof("kind")
    if kind is None:
        return {"name": None}
    sub = getattr(msg, kind)
    return {"name": sub.DESCRIPTOR.name, **_fields_of(sub)}


def _wire_error(error: ValueError, default: str) -> WireError:
    # The core's messages start with the argument's path ("schedule.gamma: ..."): that
    # path is the field the error names.
    head, _, rest = str(error).partition(": ")
    if head.startswith(default) and " " not in head and rest:
        return WireError(head, rest)
    return WireError(default, str(error))


def schedule_from_proto(msg, field: str = "schedule") -> dict:
    """A validated schedule description from an LRSchedule message; ``WireError``
    (INVALID_ARGUMENT naming the field) for an invalid one."""
    try:
        return lr_scheduler.validate(_schedule_dict(msg), field)
    except ValueError as e:
        raise _wire_error(e, field) from None


def schedule_to_proto(description: dict):
    """The LRSchedule message of a description (every argument set explicitly)."""
    d = lr_scheduler.validate(description)
    msg = coordinator_pb2.LRSchedule()
    sub = getattr(msg, _KINDS[d["name"]])
    sub.SetInParent()
    for key, value in d.items():
        if key == "name":
            continue
        if key == "schedulers":
            for child in value:
                sub.schedulers.add().CopyFrom(schedule_to_proto(child))
        elif key == "milestones":
            sub.milestones.extend(value)
        else:
            setattr(sub, key, value)
    return msg


def clipping_from_proto(msg, field: str = "clipping") -> dict:
    """A validated clipping description from a GradientClipping message."""
    kind = msg.WhichOneof("kind")
    description = {"kind": kind, **(_fields_of(getattr(msg, kind)) if kind else {})}
    try:
        return nn_utils.validate_clipping(description, field)
    except ValueError as e:
        raise _wire_error(e, field) from None


def clipping_to_proto(description: dict):
    d = nn_utils.validate_clipping(description)
    msg = coordinator_pb2.GradientClipping()
    sub = getattr(msg, d["kind"])
    sub.SetInParent()
    for key, value in d.items():
        if key != "kind":
            setattr(sub, key, value)
    return msg
