"""Metric writers (JSONL + TensorBoard), the progress bar (tqdm), and evaluation sums.

Only process 0 writes. `metrics.jsonl` holds one JSON object per event with at
least `step` and `split`; TensorBoard event files are written with tensorboardX,
which needs no TensorFlow.
"""

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from hisd_jax import jsonio, storage

ECE_BINS = 15


class MetricWriter:
    """Appends events to `metrics.jsonl` and TensorBoard scalars under `tb/`.

    `resume_step`: the step a resumed run continues from. Events logged after it by the
    interrupted run (it died between a log step and its next checkpoint) are dropped from
    metrics.jsonl (rewritten atomically) and purged from TensorBoard, so every step is logged
    once; a fresh start (None) drops every event of a run killed before its first checkpoint.
    `write(..., once=True)` skips an event whose (step, split) is already in the file (the final
    evaluation of a rerun of a finished run, or of a run whose last step validated).

    On object storage (`storage.is_object_store`), which cannot append, every event rewrites
    the whole object (one upload of some kB: as tensorboardX does with its event files there).
    """

    def __init__(self, workdir: str, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self._logged = set()  # (step, split) of every event in metrics.jsonl
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        self._path = os.path.join(workdir, "metrics.jsonl")
        self._lines = None  # object storage: the file's lines, rewritten whole at each event
        self._jsonl = None  # local disk: the file, appended to
        lines = []
        if storage.exists(self._path):  # a fresh start keeps none (a run killed before its
            # first checkpoint logged nothing a rerun keeps)
            last = -1 if resume_step is None else resume_step
            lines = [ln for ln in storage.read_text(self._path).splitlines(True) if ln.strip()]
            events = [json.loads(ln) for ln in lines]
            kept = [ln for ln, e in zip(lines, events) if e["step"] <= last]
            if len(kept) != len(lines):
                jsonio.write_text(self._path, "".join(kept))
            lines = kept
            self._logged = {(e["step"], e["split"]) for e in events if e["step"] <= last}
        if storage.is_object_store(self._path):
            self._lines = lines
        else:
            self._jsonl = open(self._path, "a")  # noqa: SIM115 (held for the run)
        purge = {} if resume_step is None else {"purge_step": resume_step + 1}
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), **purge)

    def _append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self._jsonl is not None:
            self._jsonl.write(line)
            self._jsonl.flush()
        else:
            self._lines.append(line)
            jsonio.write_text(self._path, "".join(self._lines))

    def write(self, step: int, split: str, scalars: dict, once: bool = False) -> None:
        if not self.enabled or (once and (int(step), split) in self._logged):
            return
        self._logged.add((int(step), split))
        scalars = {k: float(v) for k, v in scalars.items()}
        self._append({"step": int(step), "split": split, **scalars})
        for k, v in scalars.items():
            if math.isfinite(v):
                self._tb.add_scalar(f"{split}/{k}", v, step)
        self._tb.flush()

    def event(self, step: int, name: str, details: dict) -> None:
        """A non-scalar record in metrics.jsonl: {"step", "split": "event", "event": name,
        "details"} (not in TensorBoard)."""
        if self.enabled:
            self._append({"step": int(step), "split": "event", "event": name, "details": details})

    def close(self) -> None:
        if self.enabled:
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()


class Progress:
    """The training progress bar (tqdm on stderr: steps/s, ETA, the latest logged loss).

    Only process 0 shows it; `enabled=False` (config `train.progress`) turns it off.
    """

    def __init__(self, total: int, start: int, enabled: bool = True, label: str = "train"):
        self._bar = tqdm.tqdm(
            total=total,
            initial=start,
            desc=label,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (enabled and jax.process_index() == 0),
        )

    def update(self, step: int, loss: float | None = None) -> None:
        """Moves the bar to `step` and shows `loss`."""
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def ece_bin(conf, num_bins: int):
    """Bin of each confidence among `num_bins` equal-width bins (lo, hi] (0 goes to the first),
    the convention of Guo et al. (2017) and of inference.calibration.ece."""
    return jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)


def classification_sums(logits, labels, mask) -> dict:
    """Per-batch sums from which accuracy, mean CE and ECE follow exactly.

    Returns counts (not means) so batches and devices add up: n, correct, nll, and
    the ECE histogram over max-softmax confidence in ECE_BINS equal-width bins.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    conf = jnp.exp(jnp.max(logp, axis=-1))
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32) * mask
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    onehot = jax.nn.one_hot(ece_bin(conf, ECE_BINS), ECE_BINS) * mask[:, None]
    return {
        "n": jnp.sum(mask),
        "correct": jnp.sum(correct),
        "nll": jnp.sum(nll * mask),
        "bin_n": jnp.sum(onehot, 0),
        "bin_conf": conf @ onehot,
        "bin_correct": correct @ onehot,
    }


def regression_sums(pred, target, mask) -> dict:
    err = (pred[:, 0].astype(jnp.float32) - target) * mask
    return {"n": jnp.sum(mask), "sse": jnp.sum(err**2), "sae": jnp.sum(jnp.abs(err))}


def finalize_sums(sums: dict) -> dict:
    """Turns accumulated sums into metrics (accuracy, loss, ece | mse, mae)."""
    s = jax.tree.map(lambda x: np.asarray(x, np.float64), sums)
    n = max(float(s["n"]), 1.0)
    if "correct" in s:
        gap = np.abs(s["bin_conf"] - s["bin_correct"]).sum()
        return {
            "accuracy": float(s["correct"] / n),
            "loss": float(s["nll"] / n),
            "ece": float(gap / n),
        }
    return {"mse": float(s["sse"] / n), "mae": float(s["sae"] / n)}
