"""Models: a registry from config to a `MultiExitNet`."""

import jax.numpy as jnp
import ml_collections

from hisd_jax.kinds import get_kind

from hisd_jax.models.backbones import BACKBONES, backbone_blocks
from hisd_jax.models.multi_exit import MultiExitNet
from hisd_jax.models.transformer import TransformerExitNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def task_outputs(tasks) -> tuple[tuple[str, int], ...]:
    """(name, width of the task's head) for each task (`TaskSpec` or `data.TaskInfo`)."""
    return tuple((t.name, get_kind(t.kind).num_outputs(t.num_classes)) for t in tasks)


def exit_positions(model_cfg) -> tuple[int, ...]:
    """The block counts after which the exits sit (config override or one per stage)."""
    _, default = backbone_blocks(
        model_cfg.name, model_cfg.width, model_cfg.get("stage_sizes"), model_cfg.get("strides")
    )
    exits = model_cfg.get("exits")
    return tuple(exits) if exits else default


def num_exits(model_cfg) -> int:
    """How many exits the model of `model_cfg` has (fewer than its positions with `cut_at`)."""
    cut = model_cfg.get("cut_at")
    exits = exit_positions(model_cfg)
    return len(exits) if cut is None or cut < 0 else cut + 1


def model_section(config):
    """The config's model section with `cut_at` in the form `build_model` expects (None = full)."""
    m = config.model.to_dict()
    m["cut_at"] = None if m["cut_at"] < 0 else m["cut_at"]
    return ml_collections.ConfigDict(m)


def build_model(model_cfg, tasks, cut_at=None, dataset=None):
    """Builds the model named by `model_cfg.name` with one head per task at every exit.

    Args:
      model_cfg: the config's `model` section (fields: `config.base_config`).
      tasks: the tasks the heads predict (`mtl.tasks.TaskSpec`; `data.TaskInfo` works too).
      cut_at: overrides `model_cfg.cut_at` (an exit index): build only up to that exit.
      dataset: the `data.Dataset` (its vocabulary and sequence length size a `transformer`'s
        embeddings; ValueError if a transformer has none or the data are not token ids).
    """
    blocks, _ = backbone_blocks(
        model_cfg.name, model_cfg.width, model_cfg.get("stage_sizes"), model_cfg.get("strides")
    )
    cut = model_cfg.get("cut_at") if cut_at is None else cut_at
    retrieval = tuple(t.name for t in tasks if t.kind == "retrieval")
    if retrieval and model_cfg.name != "transformer":
        raise ValueError(
            f"retrieval task {retrieval[0]!r} needs model.name='transformer' (an encoder of "
            f"token pairs), not {model_cfg.name!r}"
        )
    if model_cfg.name == "transformer":
        if dataset is None or not dataset.vocab_size:
            raise ValueError(
                "model.name='transformer' needs a data set of token sequences (e.g. "
                f"data.name='pycode'), not {getattr(dataset, 'name', None)!r}"
            )
        width = model_cfg.width
        return TransformerExitNet(
            vocab_size=dataset.vocab_size,
            max_len=dataset.image_shape[-1],
            width=width,
            num_heads=model_cfg.num_heads,
            mlp_dim=model_cfg.mlp_ratio * width,
            exit_after=exit_positions(model_cfg),
            tasks=task_outputs(tasks),
            pool=model_cfg.pool,
            embed_dim=model_cfg.embed_dim,
            retrieval_tasks=retrieval,
            cut_at=cut,
            dtype=DTYPES[model_cfg.dtype],
            remat=bool(model_cfg.get("remat", False)),
        )
    return MultiExitNet(
        blocks=blocks,
        exit_after=exit_positions(model_cfg),
        tasks=task_outputs(tasks),
        stem=model_cfg.stem,
        stem_features=model_cfg.get("stem_features") or model_cfg.width,
        norm=model_cfg.norm,
        cut_at=cut,
        task_exits=tuple(
            (k, tuple(v)) for k, v in sorted(dict(model_cfg.get("task_exits") or {}).items())
        ),
        head_pool=model_cfg.head_pool,
        head_hidden=tuple(model_cfg.head_hidden),
        dtype=DTYPES[model_cfg.dtype],
        remat=bool(model_cfg.get("remat", False)),
    )


__all__ = [
    "BACKBONES",
    "DTYPES",
    "MultiExitNet",
    "build_model",
    "exit_positions",
    "model_section",
    "num_exits",
    "task_outputs",
]
