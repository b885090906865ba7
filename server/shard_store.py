"""The parameter shard's logic: named parameters, their optimizer state and a version per
job, as plain Python.

``ShardStore`` holds a shard's jobs (the coordinator embeds one directly, as an
:class:`EmbeddedShard`; :mod:`.shard` puts one behind the ``ParameterShard`` service).
The gradients of one step arrive one micro-batch at a time, in any order and possibly
twice; they are summed with the fixed pairwise tree of :mod:`gradmesh.server.aggregate`, so
the sum is bit for bit independent of arrival order, and the optimizer is the same pure
update function as ``gradmesh.core.optim``'s.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from typing import Any, Callable, Iterable

import grpc
import numpy as np

from gradmesh.core import dtypes, optim, serialize
from gradmesh.core.nn import utils as nn_utils
from gradmesh.server import checkpoint
from gradmesh.server.aggregate import TreeSum
from gradmesh.server.runtime import ServiceError

log = logging.getLogger("gradmesh.shard")

__all__ = ["ShardStore", "ShardJob", "EmbeddedShard", "check_job_id"]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED = grpc.StatusCode.FAILED_PRECONDITION
_JOB_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_FLOATS = tuple(np.dtype(d.np) for d in (*dtypes.HALF, dtypes.float32, dtypes.float64))


def check_job_id(job_id: str, field: str = "job_id") -> str:
    """A job id is 1 to 128 characters of [A-Za-z0-9._-] (it names checkpoint files)."""
    # fullmatch: with match, "$" also matches before a trailing newline ("j\n" passed).
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id) or job_id in (".", ".."):
        raise ServiceError(
            INVALID, f"job id {job_id!r} must be 1 to 128 characters of [A-Za-z0-9._-]", field
        )
    return job_id


# ------------------------------------------------------------------ the logic ------------


class _Pending:
    """The gradients of one step received so far."""

    def __init__(self, step_id: int, attempt: int, micro_batches: int, version: int):
        self.step_id = step_id
        self.attempt = attempt
        self.micro_batches = micro_batches
        self.version = version
        self.sum = TreeSum(micro_batches, _add_grads)
        # Parameters no micro-batch so far had a gradient for (None: no push yet).
        self.unused: set[str] | None = None


def _add_grads(a: dict, b: dict) -> dict:
    # In place into the left operand when we own writable memory: the same bits as a + b.
    out = {}
    for name, x in a.items():
        y = b[name]
        if x.flags.writeable:
            np.add(x, y, out=x)
            out[name] = x
        else:
            out[name] = x + y
    return out


def _copy(a: np.ndarray, allocate: Callable[[int], np.ndarray] | None) -> np.ndarray:
    if allocate is None:
        return a.copy()
    out = allocate(a.nbytes).view(a.dtype).reshape(a.shape)
    np.copyto(out, a)
    return out


# What a step's Apply may carry besides the step: hyper-parameters a schedule moves, and
# clipping of the summed gradient (shard.proto's ApplyRequest).
STEP_ARGS = ("lr", "momentum", "beta1", "clip_coefficient", "clip_value")


def check_step_args(step_args: dict | None, optimizer: dict) -> dict:
    """Validate an Apply's step arguments against the job's optimizer (INVALID_ARGUMENT
    naming the field); returns them as plain floats, unset ones left out."""
    out: dict = {}
    for key, value in (step_args or {}).items():
        if key not in STEP_ARGS:
            raise ServiceError(INVALID, f"unknown step argument {key!r}", key)
        value = float(value)
        if key == "clip_coefficient":
            out[key] = value  # NaN or inf too: torch scales by a non-finite total's as well
            continue
        if not (value >= 0 and np.isfinite(value)):
            raise ServiceError(INVALID, f"{key} must be a finite number >= 0, got {value}", key)
        if key == "momentum" and "momentum" not in optimizer:
            raise ServiceError(INVALID, f"{optimizer['name']} takes no momentum", key)
        if key == "beta1" and ("betas" not in optimizer or value >= 1):
            raise ServiceError(
                INVALID, f"beta1 must be in [0, 1) for an optimizer with betas, got {value}", key
            )
        if key == "clip_value" and value == 0:
            raise ServiceError(INVALID, "clip_value must be > 0", key)
        out[key] = value
    if "clip_coefficient" in out and "clip_value" in out:
        raise ServiceError(INVALID, "clip by a coefficient or by value, not both", "clip_value")
    return out


def scheduled_hyper(optimizer: dict, step_args: dict | None) -> dict:
    """The update rule's keyword arguments for one step: the job's optimizer, with the
    values the schedule gives this step."""
    hyper = {k: v for k, v in optimizer.items() if k != "name"}
    hyper.pop(optim.WEIGHT_DECAY_BY_PARAMETER, None)  # per parameter, in ShardJob._update
    args = step_args or {}
    for key in ("lr", "momentum"):
        if key in args:
            hyper[key] = args[key]
    if "betas" in hyper:
        hyper["betas"] = (args.get("beta1", hyper["betas"][0]), hyper["betas"][1])
    return hyper


def clipped(grad: np.ndarray, step_args: dict | None) -> np.ndarray:
    """The summed gradient after the step's clipping (clip_grad_norm_'s scaling with the
    coordinator's coefficient, or clip_grad_value_'s clamp): the core's own functions."""
    args = step_args or {}
    if "clip_coefficient" not in args and "clip_value" not in args:
        return grad
    if not grad.flags.writeable:  # a single micro-batch's gradient as it arrived
        grad = grad.copy()
    if "clip_value" in args:
        nn_utils.clip_values_(np, grad, args["clip_value"])
    else:
        nn_utils.scale_(grad, np.asarray(args["clip_coefficient"], dtype=np.float64))
    return grad


class ShardJob:
    """One job's parameters on one shard. Thread-safe: every method takes ``lock``."""

    def __init__(
        self,
        job_id: str,
        params: dict[str, np.ndarray],
        optimizer: dict,
        version: int = 0,
        last_step_id: int = 0,
        state: dict[str, dict] | None = None,
    ):
        self.job_id = job_id
        self.params = params
        self.optimizer = optimizer
        self.version = version
        self.last_step_id = last_step_id
        self.state: dict[str, dict] = state if state is not None else {n: {} for n in params}
        self.pending: dict[int, _Pending] = {}
        self.lock = threading.Lock()
        # The write-ahead log of applied steps (a shard with a state directory): each
        # step's summed gradient, fsynced before Apply is acknowledged, replayed on top of
        # the last checkpoint on restart, emptied by the next checkpoint.
        self.log: checkpoint.RecordLog | None = None

    @property
    def parameter_bytes(self) -> int:
        return sum(int(p.nbytes) for p in self.params.values())

    def signature(self) -> dict:
        return {n: (str(p.dtype), tuple(p.shape)) for n, p in self.params.items()}

    # -- Pull -----------------------------------------------------------------------------
    def pull(
        self,
        version: int = 0,
        names: Iterable[str] = (),
        copy: bool = False,
        allocate: Callable[[int], np.ndarray] | None = None,
    ) -> tuple[int, dict]:
        """``(version, {name: array})``. With ``copy`` the arrays are copies (in memory from
        ``allocate(nbytes)`` when given, e.g. ``BufferPool.allocate``); without, the live
        ones: read them before the next ``apply`` (the coordinator does, under its job
        lock)."""
        with self.lock:
            if version and version != self.version:
                raise ServiceError(
                    FAILED,
                    f"job {self.job_id!r} is at version "
                    f"{self.version}; version {version} is not kept",
                    "version",
                )
            names = list(names) or list(self.params)
            for i, n in enumerate(names):
                if n not in self.params:
                    raise ServiceError(
                        INVALID,
                        f"no parameter {n!r} on this shard for job {self.job_id!r}",
                        f"names[{i}]",
                    )
            if copy:
                return self.version, {n: _copy(self.params[n], allocate) for n in names}
            return self.version, {n: self.params[n] for n in names}

    # -- PushGradients --------------------------------------------------------------------
    def push(
        self,
        step_id: int,
        micro_batch: int,
        micro_batches: int,
        version: int,
        gradients: dict[str, np.ndarray],
        attempt: int = 0,
        unused: Iterable[str] = (),
    ) -> tuple[bool, int]:
        """Record one micro-batch's gradients; ``(duplicate, received)``. ``unused``: the
        parameters the loss does not depend on (zeros in ``gradients``); one unused in
        every micro-batch is left alone by ``apply``, as torch.optim skips a grad of None.

        Gradients are pending for one (step, attempt) at a time: a push for another step
        or another attempt means the coordinator abandoned the pending one."""
        if step_id < 1:
            raise ServiceError(INVALID, "step ids start at 1", "step_id")
        if micro_batches < 1:
            raise ServiceError(INVALID, "micro_batches must be >= 1", "micro_batches")
        if not 0 <= micro_batch < micro_batches:
            raise ServiceError(
                INVALID,
                f"micro_batch {micro_batch} out of range for {micro_batches} micro-batches",
                "micro_batch",
            )
        self._check_gradients(gradients)
        with self.lock:
            if step_id <= self.last_step_id:
                return True, micro_batches  # a late result of a committed step
            if version != self.version:
                raise ServiceError(
                    FAILED,
                    f"gradients computed at version {version}, job "
                    f"{self.job_id!r} is at version {self.version}",
                    "version",
                )
            p = self.pending.get(step_id)
            if p is None or p.attempt != attempt:
                self.pending = {step_id: _Pending(step_id, attempt, micro_batches, version)}
                p = self.pending[step_id]
            elif p.micro_batches != micro_batches:
                raise ServiceError(
                    INVALID,
                    f"step {step_id} has {p.micro_batches} "
                    f"micro-batches, this push says {micro_batches}",
                    "micro_batches",
                )
            if micro_batch in p.sum:
                return True, len(p.sum)
            mine = set(unused) & set(self.params)
            p.unused = mine if p.unused is None else p.unused & mine
            p.sum.add(micro_batch, dict(gradients))
            return False, len(p.sum)

    def check_gradient_headers(self, headers) -> None:
        """Check a push's header (NamedTensors with dtype and shape) against the parameters
        before anything is allocated for its bytes: a header that promises gigabytes for
        a small parameter is refused without reading its chunks."""
        expected = {
            n: (serialize.DTYPE_TO_PROTO[dtypes.from_numpy(p.dtype)], p.shape)
            for n, p in self.params.items()
        }
        serialize.check_headers(
            headers, expected, "gradients", f"parameter on this shard for job {self.job_id!r}"
        )

    def _check_gradients(self, gradients: dict[str, np.ndarray]) -> None:
        for name, g in gradients.items():
            p = self.params.get(name)
            if p is None:
                raise ServiceError(
                    INVALID,
                    f"no parameter {name!r} on this shard for job {self.job_id!r}",
                    f"gradients[{name}]",
                )
            if g.shape != p.shape or g.dtype != p.dtype:
                raise ServiceError(
                    INVALID,
                    f"gradient of {name!r} has dtype {g.dtype} and "
                    f"shape {list(g.shape)}; the parameter has dtype "
                    f"{p.dtype} and shape {list(p.shape)}",
                    f"gradients[{name}]",
                )
        missing = sorted(set(self.params) - set(gradients))
        if missing:
            raise ServiceError(INVALID, f"gradients missing for parameters {missing}", "gradients")

    # -- Apply ----------------------------------------------------------------------------
    def apply(
        self,
        step_id: int,
        micro_batches: int,
        version: int,
        attempt: int = 0,
        checkpoint_path: str | None = None,
        step_args: dict | None = None,
    ) -> tuple[int, bool, float]:
        """Sum the step's gradients and update every parameter; ``(version, already, secs)``.

        ``checkpoint_path``: checkpoint first, the state *before* this step (the step goes
        to the emptied log): the shard can then still rebuild the version before its last
        step, which the coordinator needs to retry a step that only some shards applied.
        ``step_args``: this step's scheduled hyper-parameters and clipping
        (:func:`check_step_args`), logged with the step so a replay applies them again."""
        step_args = check_step_args(step_args, self.optimizer)
        with self.lock:
            if step_id == self.last_step_id and version + 1 == self.version:
                return self.version, True, 0.0
            p = self._complete_pending(step_id, micro_batches, version, attempt)
            start = time.perf_counter()
            grads = p.sum.result()
            skip = sorted(p.unused or ())
            if checkpoint_path:
                try:
                    self._save(checkpoint_path)
                except OSError as e:  # the old checkpoint and the log still hold it
                    log.warning("checkpoint failed", extra={"job_id": self.job_id, "error": str(e)})
            if self.log is not None:
                # Durable before anything changes: a failed write (disk full) applies
                # nothing and the step can be retried; a record that reached the disk is
                # replayed after a crash, so an acknowledged step is never lost.
                meta: dict[str, Any] = {"step_id": step_id, "version": self.version}
                if step_args:
                    meta["args"] = step_args
                try:
                    self.log.append(
                        meta | ({"unused": skip} if skip else {}),
                        {n: grads[n] for n in sorted(grads)},
                    )
                except OSError as e:
                    raise ServiceError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"step {step_id} of job {self.job_id!r} not applied: "
                        f"cannot write the shard's step log "
                        f"{self.log.path}: {e}",
                        "step_id",
                    ) from None
            self._update(grads, step_args, skip)
            self.pending.clear()
            self.version += 1
            self.last_step_id = step_id
            return self.version, False, time.perf_counter() - start

    def gradient_norms(
        self, step_id: int, micro_batches: int, version: int, attempt: int, norm_type: float
    ) -> dict[str, float]:
        """The ``norm_type`` norm of each summed step gradient (in its dtype), by name:
        this shard's part of ``clip_grad_norm_``'s total. Changes nothing."""
        if not norm_type >= 0:
            raise ServiceError(INVALID, f"norm_type must be >= 0, got {norm_type}", "norm_type")
        with self.lock:
            p = self._complete_pending(step_id, micro_batches, version, attempt)
            grads = p.sum.result()
            names = sorted(grads)
            norms = nn_utils.grad_norms(np, [grads[n] for n in names], norm_type)
            return {n: float(v) for n, v in zip(names, norms)}

    def _complete_pending(
        self, step_id: int, micro_batches: int, version: int, attempt: int
    ) -> "_Pending":
        """The step's pending gradients, every micro-batch of ``attempt`` pushed (the
        caller holds the lock); FAILED_PRECONDITION saying what is missing otherwise."""
        if step_id <= self.last_step_id:
            raise ServiceError(
                FAILED,
                f"step {step_id} is older than the last applied "
                f"step {self.last_step_id} of job {self.job_id!r}",
                "step_id",
            )
        if micro_batches < 1:
            raise ServiceError(INVALID, "micro_batches must be >= 1", "micro_batches")
        if version != self.version:
            raise ServiceError(
                FAILED,
                f"step computed at version {version}, job "
                f"{self.job_id!r} is at version {self.version}",
                "version",
            )
        p = self.pending.get(step_id)
        if p is not None and p.attempt != attempt:
            raise ServiceError(
                FAILED,
                f"step {step_id} of job {self.job_id!r}: the "
                f"pending gradients belong to attempt {p.attempt}, not "
                f"{attempt}",
                "attempt",
            )
        if p is None or p.micro_batches != micro_batches or not p.sum.complete:
            # The first few missing indices only: micro_batches comes from the request
            # and may be 2**32 - 1 (listing them all would take minutes and gigabytes).
            received = () if p is None or p.micro_batches != micro_batches else p.sum
            missing = list(
                itertools.islice((m for m in range(micro_batches) if m not in received), 20)
            )
            raise ServiceError(
                FAILED,
                f"step {step_id} of job {self.job_id!r}: "
                f"gradients of micro-batches {missing} "
                f"{'(the first 20) ' if micro_batches > 20 else ''}"
                f"not pushed",
                "micro_batches",
            )
        return p

    def _update(
        self, grads: dict[str, np.ndarray], step_args: dict | None = None, skip: Iterable[str] = ()
    ) -> None:
        hyper = scheduled_hyper(self.optimizer, step_args)
        decays = self.optimizer.get(optim.WEIGHT_DECAY_BY_PARAMETER, {})
        update = optim.UPDATE_RULES[self.optimizer["name"]]
        skipped = set(skip)
        for name in sorted(self.params):
            if name in skipped:  # no gradient reached it: torch.optim skips it too
                continue
            grad = clipped(grads[name], step_args)
            own = {**hyper, "weight_decay": decays[name]} if name in decays else hyper
            update(np, self.params[name], grad, self.state[name], **own)

    def replay(self, records: Iterable[tuple[dict, dict]], up_to_version: int | None = None) -> int:
        """Re-apply logged steps that follow this state (the same update on the same
        summed gradients: the same bits); returns how many were applied."""
        applied = 0
        for meta, grads in records:
            if up_to_version is not None and self.version >= up_to_version:
                break
            if meta["step_id"] <= self.last_step_id or meta["version"] != self.version:
                continue
            self._update(grads, meta.get("args"), meta.get("unused", ()))
            self.version += 1
            self.last_step_id = meta["step_id"]
            applied += 1
        return applied

    # -- checkpoints ----------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Checkpoint to ``path``, then empty the step log (its steps are in it)."""
        with self.lock:
            self._save(path)

    def _save(self, path: str) -> None:
        arrays: dict[str, np.ndarray] = {}
        steps: dict[str, int] = {}
        for name, p in self.params.items():
            arrays[f"param/{name}"] = p
            state_arrays, steps[name] = optim.state_to_arrays(self.state[name])
            for key, a in state_arrays.items():
                arrays[f"state/{name}/{key}"] = a
        meta = {
            "job_id": self.job_id,
            "version": self.version,
            "last_step_id": self.last_step_id,
            "optimizer": self.optimizer,
            "parameters": list(self.params),
            "steps": steps,
        }
        checkpoint.save(path, arrays, meta)
        if self.log is not None:
            self.log.truncate()

    @classmethod
    def load(cls, path: str) -> "ShardJob":
        arrays, meta = checkpoint.load(path)
        params = {n: np.array(arrays[f"param/{n}"]) for n in meta["parameters"]}
        state = {}
        for n in meta["parameters"]:
            prefix = f"state/{n}/"
            found = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            state[n] = (
                optim.state_from_arrays(found, meta["steps"][n])
                if (found or meta["steps"][n])
                else {}
            )
        return cls(
            meta["job_id"], params, meta["optimizer"], meta["version"], meta["last_step_id"], state
        )


class ShardStore:
    """All jobs of one shard, with checkpoints in ``state_dir`` (one ``<job>.npz`` each).

    >>> store = ShardStore()
    >>> store.load("j", {"w": np.ones(2, np.float32)}, {"name": "sgd", "lr": 0.5})
    (0, 0)
    >>> store.push("j", 1, 0, 1, 0, {"w": np.ones(2, np.float32)})
    (False, 1)
    >>> store.apply("j", 1, 1, 0)[:2]
    (1, False)
    >>> store.pull("j")[1]["w"].tolist()
    [0.5, 0.5]
    """

    def __init__(
        self, state_dir: str | None = None, checkpoint_every: int = 0, sync_log: bool = True
    ):
        self.state_dir = state_dir
        self.sync_log = sync_log
        self.checkpoint_every = checkpoint_every
        self.jobs: dict[str, ShardJob] = {}
        self._lock = threading.Lock()
        if state_dir:
            os.makedirs(state_dir, exist_ok=True)
            for entry in sorted(os.listdir(state_dir)):
                if entry.endswith(".npz") and not entry.startswith("."):
                    job = ShardJob.load(os.path.join(state_dir, entry))
                    job.log = checkpoint.RecordLog(self._log_path(job.job_id), self.sync_log)
                    replayed = job.replay(job.log.records())
                    self.jobs[job.job_id] = job
                    log.info(
                        "restored job",
                        extra={
                            "job_id": job.job_id,
                            "version": job.version,
                            "replayed_steps": replayed,
                        },
                    )

    def job(self, job_id: str) -> ShardJob:
        job = self.jobs.get(job_id)
        if job is None:
            check_job_id(job_id)
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND, f"job {job_id!r} is not loaded on this shard", "job_id"
            )
        return job

    def load(self, job_id: str, params: dict[str, np.ndarray], optimizer: dict) -> tuple[int, int]:
        """Create the job (idempotent for the same names, dtypes and shapes)."""
        check_job_id(job_id)
        for name, p in params.items():
            if p.dtype not in _FLOATS:
                raise ServiceError(
                    INVALID,
                    f"parameter {name!r} has dtype {p.dtype}; parameters must be floating point",
                    f"parameters[{name}]",
                )
        optimizer = optim.validate(optimizer)
        with self._lock:
            job = self.jobs.get(job_id)
            if job is not None:
                mine = {n: (str(p.dtype), tuple(p.shape)) for n, p in params.items()}
                if job.signature() != mine or job.optimizer != optimizer:
                    raise ServiceError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"job {job_id!r} exists on this shard with other parameters or optimizer",
                        "job_id",
                    )
                return job.version, job.last_step_id
            # Own writable copies: the optimizer updates them in place.
            job = ShardJob(
                job_id, {n: np.array(p, copy=True) for n, p in params.items()}, optimizer
            )
            if self.state_dir:
                job.log = checkpoint.RecordLog(self._log_path(job_id), self.sync_log)
                job.log.truncate()  # a dropped job's leftovers are not this job's
            self.jobs[job_id] = job
        self.checkpoint(job_id)
        return job.version, job.last_step_id

    def pull(
        self,
        job_id: str,
        version: int = 0,
        names: Iterable[str] = (),
        copy: bool = False,
        allocate: Callable[[int], np.ndarray] | None = None,
    ):
        job = self.job(job_id)
        try:
            return job.pull(version, names, copy, allocate)
        except ServiceError:
            old = self._rebuild(job, version) if version else None
            if old is None:
                raise
            return old.pull(version, names, copy, allocate)

    def _rebuild(self, job: ShardJob, version: int) -> ShardJob | None:
        """An older version of a job, rebuilt from its checkpoint and step log (after a
        crash between shards' Applies, the coordinator retries the step from the version
        before it); None when it cannot be."""
        if not self.state_dir or job.log is None or version >= job.version:
            return None
        with job.lock:
            try:
                old = ShardJob.load(self._path(job.job_id))
            except (OSError, checkpoint.CheckpointError):
                return None
            if old.version > version:
                return None
            old.replay(job.log.records(), up_to_version=version)
        return old if old.version == version else None

    def push(
        self,
        job_id: str,
        step_id: int,
        micro_batch: int,
        micro_batches: int,
        version: int,
        gradients: dict[str, np.ndarray],
        attempt: int = 0,
        unused: Iterable[str] = (),
    ) -> tuple[bool, int]:
        return self.job(job_id).push(
            step_id, micro_batch, micro_batches, version, gradients, attempt, unused
        )

    def apply(
        self,
        job_id: str,
        step_id: int,
        micro_batches: int,
        version: int,
        checkpoint_now: bool = False,
        attempt: int = 0,
        step_args: dict | None = None,
    ) -> tuple[int, bool, float]:
        job = self.job(job_id)
        due = checkpoint_now or bool(
            self.checkpoint_every and (version + 1) % self.checkpoint_every == 0
        )
        return job.apply(
            step_id,
            micro_batches,
            version,
            attempt,
            self._path(job_id) if due and self.state_dir else None,
            step_args,
        )

    def gradient_norms(
        self,
        job_id: str,
        step_id: int,
        micro_batches: int,
        version: int,
        attempt: int = 0,
        norm_type: float = 2.0,
    ) -> dict[str, float]:
        return self.job(job_id).gradient_norms(step_id, micro_batches, version, attempt, norm_type)

    def close(self) -> None:
        """Close the step logs (their records are already on disk)."""
        for job in list(self.jobs.values()):
            if job.log is not None:
                job.log.close()

    def drop(self, job_id: str) -> bool:
        with self._lock:
            job = self.jobs.pop(job_id, None)
        if job is not None and self.state_dir:
            if job.log is not None:
                job.log.close()
            for path in (self._path(job_id), self._log_path(job_id)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        return job is not None

    def _path(self, job_id: str) -> str:
        return os.path.join(self._dir(), f"{job_id}.npz")

    def _log_path(self, job_id: str) -> str:
        return os.path.join(self._dir(), f"{job_id}.steps.log")

    def _dir(self) -> str:
        if not self.state_dir:  # callers check first: files only with a state directory
            raise RuntimeError("this shard keeps no files (no state directory)")
        return self.state_dir

    def checkpoint(self, job_id: str | None = None) -> None:
        """Write the checkpoint of one job (or all) when there is a state directory."""
        if not self.state_dir:
            return
        for jid in [job_id] if job_id else list(self.jobs):
            job = self.jobs.get(jid)
            if job is not None:
                job.save(self._path(jid))


# ------------------------------------------------------------------ handles --------------


class EmbeddedShard:
    """A shard inside the coordinator's process: the same ``ShardStore``, no network."""

    def __init__(self, store: ShardStore, name: str = "embedded"):
        self.store = store
        self.name = name

    def load(self, job_id, params, optimizer):
        return self.store.load(job_id, params, optimizer)

    def pull(self, job_id, version=0, names=(), copy=False):
        return self.store.pull(job_id, version, names, copy)

    def push(
        self, job_id, step_id, micro_batch, micro_batches, version, gradients, attempt=0, unused=()
    ):
        return self.store.push(
            job_id, step_id, micro_batch, micro_batches, version, gradients, attempt, unused
        )

    def apply(
        self,
        job_id,
        step_id,
        micro_batches,
        version,
        checkpoint_now=False,
        attempt=0,
        step_args=None,
    ):
        return self.store.apply(
            job_id, step_id, micro_batches, version, checkpoint_now, attempt, step_args
        )

    def gradient_norms(self, job_id, step_id, micro_batches, version, attempt=0, norm_type=2.0):
        return self.store.gradient_norms(
            job_id, step_id, micro_batches, version, attempt, norm_type
        )

    def status(self, job_id):
        job = self.store.jobs.get(job_id)
        return None if job is None else (job.version, job.last_step_id)

    def checkpoint(self):
        self.store.checkpoint()

    def close(self):
        pass
