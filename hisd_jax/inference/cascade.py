"""Batched early-exit inference that skips deeper computation, and its mask-based reference.

Two ways to run an early-exit policy over a data set:

  * mask-based (the reference): run every segment and every head on every example
    (`all_exit_logits`), then pick each example's exit from the logits of all exits
    (`mask_policy`, i.e. `policies.threshold_exit` / `policies.patience_exit`). Its results
    are what the policy means; its cost is the whole model plus every head.
  * compacting cascade (`Cascade`): per batch, run segment 0 and head 0, decide on device
    which examples exit, gather the undecided ones into a bucket of a fixed size (powers of
    two up to the batch size, or always the batch size) and run the next segment on that
    bucket only. Bucket sizes come from a fixed set, so each (segment, bucket) pair compiles
    once and nothing recompiles per batch; thresholds are traced arguments, so changing them
    never recompiles either.

Both return per example the chosen exit, the prediction and the chosen exit's logits. The
cascade also counts the FLOPs it ran (per-piece XLA costs from `cost.piece_flops` times the
number of real examples in each stage, and separately the padded bucket sizes).
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from hisd_jax.inference import cost as cost_lib
from hisd_jax.inference import policies

POLICIES = (*policies.CONFIDENCE_KINDS, "patience")
BUCKETS = ("pow2", "batch")


def bucket_sizes(batch_size: int, buckets: str = "pow2", min_bucket: int = 8) -> tuple[int, ...]:
    """Sorted bucket sizes: powers of two from `min_bucket` below `batch_size`, then `batch_size`
    ("pow2"), or just `batch_size` ("batch")."""
    if buckets not in BUCKETS:
        raise ValueError(f"Unknown buckets {buckets!r}; allowed: {', '.join(BUCKETS)}.")
    sizes = []
    if buckets == "pow2":
        b = max(1, min_bucket)
        while b < batch_size:
            sizes.append(b)
            b *= 2
    return (*sizes, batch_size)


def _bucket_for(n: int, sizes) -> int:
    return next(s for s in sizes if s >= n)


def _check_policy(policy):
    if policy not in POLICIES:
        raise ValueError(f"Unknown policy {policy!r}; allowed: {', '.join(POLICIES)}.")


def float32_ceiling(thresholds) -> np.ndarray:
    """The smallest float32 >= each threshold: for a float32 confidence c and any float64
    threshold t, c >= t exactly when c >= float32_ceiling(t), so the cascade (float32)
    decides as the host did when it fitted t (rounding t to nearest could flip a confidence
    that lies between t and its rounded value)."""
    t = np.asarray(thresholds, np.float64)
    f = t.astype(np.float32)
    return np.where(f < t, np.nextafter(f, np.float32(np.inf)), f).astype(np.float32)


def mask_policy(logits, policy="max_softmax", thresholds=None, patience=None, temperatures=None):
    """Reference early exit over all exits' logits ``[E, N, C]`` on the host, deciding in the
    cascade's arithmetic (float32 confidences and thresholds, `policies.cascade_confidence`).

    Returns ``(exit_idx [N], preds [N], chosen_logits [N, C])``.
    """
    _check_policy(policy)
    z = np.asarray(logits, dtype=np.float64)
    if policy == "patience":
        exit_idx = policies.patience_exit(z.argmax(-1), int(patience))
    else:
        conf = policies.cascade_confidence(logits, policy, temperatures)
        exit_idx = policies.threshold_exit(conf, np.asarray(thresholds, dtype=np.float64))
    preds, chosen = policies.apply_exits(np.asarray(logits), exit_idx)
    return exit_idx, preds, chosen


def _batches(images, batch_size):
    for start in range(0, images.shape[0], batch_size):
        yield start, images[start : start + batch_size]


def _pad_rows(x, size):
    """Pads ``x`` to ``size`` rows by repeating row 0 (a valid input; its outputs are dropped)."""
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.repeat(x[:1], size - x.shape[0], axis=0)])


@functools.partial(jax.jit, static_argnames=("model", "task"))
def _all_logits(variables, x, *, model, task):
    return jnp.stack(model.apply(variables, x)["logits"][task])


def all_exit_logits(model, variables, images, task, batch_size=256):
    """Logits of every exit for ``task`` over host ``images [N, ...]``: ``[E, N, C]`` float32.

    One jitted full-model forward per batch of a fixed size (the last batch is padded).
    """
    out = []
    for _, x in _batches(images, batch_size):
        n = x.shape[0]
        out.append((_all_logits(variables, _pad_rows(x, batch_size), model=model, task=task), n))
    return np.concatenate([np.asarray(z)[:, :n] for z, n in out], axis=1)


@functools.partial(jax.jit, static_argnames=("model", "task", "segments", "first", "last"))
def _stage(variables, x, prev_pred, run, rule, *, model, task, segments, first, last):
    """The `segments` of `model` (consecutive indices) and the head of the last of them, on a
    bucket ``x``: one stage of the cascade, from the previous exit of `task` to its next one.

    Returns (segment output or None at the task's final exit, logits, pred, run length, done).
    `rule` holds traced scalars (policy index into `POLICIES`, threshold, temperature,
    patience), so one compiled program per (model, task, stage, bucket size) serves every
    policy and setting.
    """
    cls = type(model)
    h = x
    for i in segments:
        h = model.apply(variables, i, h, method=cls.run_segment)
    logits = model.apply(variables, segments[-1], h, method=cls.run_head)["logits"][task]
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    run = jnp.ones_like(run) if first else jnp.where(pred == prev_pred, run + 1, 1)
    if last:
        return None, logits, pred, run, jnp.ones(pred.shape, bool)
    z = logits / rule["temperature"]
    kinds = policies.CONFIDENCE_KINDS
    kind = jnp.minimum(rule["policy"], len(kinds) - 1)
    conf = jax.lax.switch(kind, [functools.partial(policies.confidence, kind=k) for k in kinds], z)
    patient = rule["policy"] == POLICIES.index("patience")
    done = jnp.where(patient, run >= rule["patience"], conf >= rule["threshold"])
    return h, logits, pred, run, done


@jax.jit
def _take(tree, idx):
    return jax.tree.map(lambda a: a[idx], tree)


class _Outputs:
    """What a `Cascade` call collects: per example its exit, prediction and chosen logits, per
    stage the real examples and the bucket rows that ran it."""

    def __init__(self, num_examples: int, num_exits: int):
        self.exit_idx = np.full(num_examples, -1, np.int64)
        self.preds = np.zeros(num_examples, np.int64)
        self.logits = None  # [N, C], allocated at the first stage (C is known then)
        self.stage_sizes = np.zeros(num_exits, np.int64)
        self.bucket_rows = np.zeros(num_exits, np.int64)

    def record(self, i: int, rows: np.ndarray, logits, pred, done) -> np.ndarray:
        """Records the live slots [0:len(rows)] of a bucket that exit at stage i (`done`);
        `rows` are their output rows. Returns the slots that go on."""
        n = rows.shape[0]
        done = done[:n]
        exiting = rows[done]
        self.exit_idx[exiting] = i
        self.preds[exiting] = pred[:n][done]
        if self.logits is None:
            self.logits = np.zeros((self.exit_idx.shape[0], logits.shape[-1]), logits.dtype)
        self.logits[exiting] = logits[:n][done]
        return np.flatnonzero(~done)


class Cascade:
    """Compacting early-exit cascade over a `MultiExitNet` for one classification task.

    Args:
      model: the multi-exit model (any `cut_at`); `variables`: {'params', 'batch_stats'}.
      task: task name whose logits drive the policy and are returned. The cascade stops at
        the exits where the task has a head (`model.exits_of(task)`, every exit by default);
        its stage k runs the segments from the previous such exit up to exit k's. Exit indices
        in results (`exit_idx`, `stage_sizes`) and the per-stage `thresholds`/`temperatures`
        count these exits only.
      policy: one of `POLICIES`. Threshold policies exit at the first e with
        confidence(logits_e / T_e) >= thresholds[e] (`policies.threshold_exit`); "patience"
        exits at the first e whose prediction has been the same for `patience` exits.
      batch_size: examples per batch (the last batch uses the smallest bucket that holds it).
      buckets, min_bucket: the bucket sizes undecided examples are compacted into
        (`bucket_sizes`). "batch" keeps every stage at the batch size (no compute is skipped,
        only the control flow runs: a baseline for the compaction itself).
      image_shape: per-example input shape, needed to cost each piece (`cost.piece_flops`);
        without it (or `pieces`, that function's result) FLOPs are not counted.
    """

    def __init__(
        self,
        model,
        variables,
        task,
        policy="max_softmax",
        *,
        batch_size=256,
        buckets="pow2",
        min_bucket=8,
        image_shape=None,
        pieces=None,
    ):
        _check_policy(policy)
        self.model, self.variables, self.task, self.policy = model, variables, task, policy
        self.exits = tuple(model.exits_of(task))
        self.num_exits = len(self.exits)
        starts = (0, *(e + 1 for e in self.exits[:-1]))
        self.stages = tuple(tuple(range(a, e + 1)) for a, e in zip(starts, self.exits))
        self.batch_size = batch_size
        self.sizes = bucket_sizes(batch_size, buckets, min_bucket)
        self.piece_costs = None
        if pieces is None and image_shape is not None:
            pieces = cost_lib.piece_flops(model, variables, image_shape)
        if pieces is not None:
            costs = cost_lib.exit_costs(pieces, self.exits)
            self.piece_costs = costs["stage_segments"] + costs["heads"]

    def __call__(self, images, thresholds=None, patience=None, temperatures=None):
        """Runs the cascade over host ``images [N, ...]``.

        Returns a dict of host arrays: exit_idx [N], preds [N], logits [N, C] (at the chosen
        exit), stage_sizes [E] (real examples that ran each segment), bucket_rows [E] (rows
        computed including padding) and, when the pieces are costed, flops_per_example (the
        FLOPs of the pieces each example actually ran, averaged) and padded_flops_per_example
        (the FLOPs of the buckets run, padding included, per example).
        """
        rules = self._rules(thresholds, patience, temperatures)
        out = _Outputs(images.shape[0], self.num_exits)
        for start, x in _batches(images, self.batch_size):
            self._run_batch(x, start, rules, out)
        return self._result(out)

    def _rules(self, thresholds, patience, temperatures) -> list[dict]:
        """Per exit, the traced `rule` argument of `_stage`: policy index, threshold,
        temperature (1 without `temperatures`) and patience."""
        num_exits = self.num_exits
        if self.policy == "patience":
            if patience is None:
                raise ValueError("policy 'patience' needs patience")
            thresholds = np.zeros(num_exits)
        elif thresholds is None:
            raise ValueError(f"policy {self.policy!r} needs thresholds")
        thr = float32_ceiling(thresholds)
        temps = np.ones(num_exits, np.float32) if temperatures is None else temperatures
        temps = np.asarray(temps, np.float32)
        return [
            {
                "policy": np.int32(POLICIES.index(self.policy)),
                "threshold": thr[i],
                "temperature": temps[i],
                "patience": np.int32(0 if patience is None else patience),
            }
            for i in range(num_exits)
        ]

    def _run_batch(self, x, start: int, rules: list[dict], out: _Outputs) -> None:
        """One batch through the stages: after each, the examples that exit are recorded in
        `out` and the others are compacted into the smallest bucket that holds them."""
        n = x.shape[0]
        size = _bucket_for(n, self.sizes)
        rows = start + np.arange(n)  # output rows of the live slots [0:n] of the bucket
        h = _pad_rows(x, size)
        prev_pred = np.zeros(size, np.int32)
        run = np.zeros(size, np.int32)
        for i in range(self.num_exits):
            out.stage_sizes[i] += n
            out.bucket_rows[i] += size
            h, logits, pred, run, done = _stage(
                self.variables,
                h,
                prev_pred,
                run,
                rules[i],
                model=self.model,
                task=self.task,
                segments=self.stages[i],
                first=i == 0,
                last=i == self.num_exits - 1,
            )
            keep = out.record(i, rows, *jax.device_get((logits, pred, done)))
            if keep.size == 0:
                break
            prev_pred = pred
            if keep.size == n:  # nobody exited: the bucket stays as it is
                continue
            n, rows = keep.size, rows[keep]
            size = _bucket_for(n, self.sizes)
            idx = np.concatenate([keep, np.zeros(size - n, keep.dtype)]).astype(np.int32)
            h, prev_pred, run = _take((h, pred, run), idx)

    def _result(self, out: _Outputs) -> dict:
        result = {
            "exit_idx": out.exit_idx,
            "preds": out.preds,
            "logits": out.logits,
            "stage_sizes": out.stage_sizes,
            "bucket_rows": out.bucket_rows,
        }
        if self.piece_costs is not None:
            n_total = out.exit_idx.shape[0]
            result["flops_per_example"] = float(out.stage_sizes @ self.piece_costs / n_total)
            result["padded_flops_per_example"] = float(out.bucket_rows @ self.piece_costs / n_total)
        return result


def full_model_fn(model, task):
    """Jitted ``(variables, x) -> final-exit logits`` of `task`: every segment up to the task's
    deepest exit and only that exit's head (the cost of the full model as a standalone
    network)."""
    cls = type(model)
    last = model.exits_of(task)[-1]

    def fn(variables, x):
        for i in range(last + 1):
            x = model.apply(variables, i, x, method=cls.run_segment)
        return model.apply(variables, last, x, method=cls.run_head)["logits"][task]

    return jax.jit(fn)


def run_full_model(fn, variables, images, batch_size, sizes=None):
    """Final-exit predictions ``[N]`` of `full_model_fn` over host ``images``, one fixed-size
    batch at a time (the last batch padded to the smallest of `sizes` that holds it)."""
    sizes = sizes or (batch_size,)
    outs = []
    for _, x in _batches(images, batch_size):
        n = x.shape[0]
        outs.append((jnp.argmax(fn(variables, _pad_rows(x, _bucket_for(n, sizes))), -1), n))
    return np.concatenate([np.asarray(p)[:n] for p, n in outs])


def time_interleaved(fns, repeats=3, warmup=1):
    """Best wall-clock seconds of each of ``fns`` over `repeats` rounds after `warmup` rounds;
    a round calls every function once, so drifting machine load affects them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def measure_speed(
    cascade: Cascade, images, *, thresholds=None, patience=None, temperatures=None, repeats=3
):
    """Wall-clock throughput of the cascade against the full model on the same ``images``,
    same batch size, after one warm-up pass of each (which compiles every bucket shape used).

    Returns full_s, cascade_s (best of `repeats` interleaved passes over the whole set),
    examples per second for both and speedup = full_s / cascade_s.
    """
    full = full_model_fn(cascade.model, cascade.task)
    run_full = functools.partial(
        run_full_model, full, cascade.variables, images, cascade.batch_size, cascade.sizes
    )
    run_cascade = functools.partial(
        cascade, images, thresholds=thresholds, patience=patience, temperatures=temperatures
    )
    full_s, cascade_s = time_interleaved([run_full, run_cascade], repeats)
    n = images.shape[0]
    return {
        "batch_size": cascade.batch_size,
        "buckets": list(cascade.sizes),
        "examples": int(n),
        "full_s": full_s,
        "cascade_s": cascade_s,
        "full_examples_per_s": n / full_s,
        "cascade_examples_per_s": n / cascade_s,
        "speedup": full_s / cascade_s,
    }
