"""Parameter roles as a label tree: which leaves are shared, which belong to an exit or a task.

`MultiExitNet.param_labels(params)` returns a tree with the structure of `params` whose leaves
are strings:

  "trunk:{i}"          segment i of the shared trunk (stem and blocks up to exit i)
  "exit:{e}"           exit head e's layers shared by the tasks at that exit (hidden layers)
  "task:{e}:{name}"    task `name`'s own output layer at exit e
  "proj:{e}"           exit e's HiSD feature projection P_e

Every consumer that needs "which leaves are shared", "which leaves exit e needs" or "which
leaves are task t's own" asks this tree (`role`, `exit_of`, `task_of`), never the submodule
names: the MTL strategies (task-owned leaves get their own gradient; the head side of the
representation-space split), the per-exit cost tables, `export`, and sharding rules. The
labels are strings so the tree can drive `optax.multi_transform` directly.
"""

from __future__ import annotations

import jax

TRUNK, EXIT, TASK, PROJ = "trunk", "exit", "task", "proj"
ROLES = (TRUNK, EXIT, TASK, PROJ)


def trunk(segment: int) -> str:
    return f"{TRUNK}:{segment}"


def exit_shared(e: int) -> str:
    return f"{EXIT}:{e}"


def task_head(task: str, e: int) -> str:
    return f"{TASK}:{e}:{task}"


def projection(e: int) -> str:
    return f"{PROJ}:{e}"


def role(label: str) -> str:
    """'trunk', 'exit', 'task' or 'proj'."""
    return label.split(":", 1)[0]


def exit_of(label: str) -> int:
    """The exit (or trunk segment) index a label belongs to."""
    return int(label.split(":")[1])


def task_of(label: str) -> str | None:
    """The task owning a 'task' leaf; None for shared leaves."""
    parts = label.split(":", 2)
    return parts[2] if parts[0] == TASK else None


def is_shared(label: str) -> bool:
    """Whether the leaf is shared between tasks (everything but a task's own output layer)."""
    return role(label) != TASK


def needed_by_exit(label: str, e: int) -> bool:
    """Whether a model cut at exit e (for inference) needs the leaf: trunk segments <= e and
    exit e's head without its projection (which only training uses)."""
    r = role(label)
    if r == TRUNK:
        return exit_of(label) <= e
    return r in (EXIT, TASK) and exit_of(label) == e


def expand(prefix_labels: dict, params, where: str = "model"):
    """A label per leaf of `params` from one label per top-level entry of `prefix_labels`.

    Raises:
      ValueError: if `params` has an entry without a label, or a label names an entry that
        `params` lacks (a renamed or unlabelled submodule).
    """
    missing = sorted(set(params) - set(prefix_labels))
    extra = sorted(set(prefix_labels) - set(params))
    if missing or extra:
        raise ValueError(
            f"parameter labels of the {where} do not match its parameters: unlabelled "
            f"{missing or 'none'}, labelled but absent {extra or 'none'}"
        )
    return {
        k: (v if isinstance(v, dict) else jax.tree.map(lambda _, v=v: v, params[k]))
        for k, v in prefix_labels.items()
    }


def leaves_where(labels_tree, tree, predicate):
    """The leaves of `tree` whose label satisfies `predicate`, in tree order."""
    flat_labels = jax.tree.leaves(labels_tree)
    flat = jax.tree.leaves(tree, is_leaf=lambda x: x is None)
    if len(flat_labels) != len(flat):
        raise ValueError(f"label tree has {len(flat_labels)} leaves, the tree {len(flat)}")
    return [x for label, x in zip(flat_labels, flat) if predicate(label)]


def select(tree: dict, labels_tree: dict, predicate) -> dict:
    """The nested-dict `tree` with only the leaves whose label satisfies `predicate` (dicts left
    empty are dropped)."""
    out = {}
    for key, sub in tree.items():
        if isinstance(sub, dict):
            kept = select(sub, labels_tree[key], predicate)
            if kept:
                out[key] = kept
        elif predicate(labels_tree[key]):
            out[key] = sub
    return out
