"""Training programs: what one unit of work is and what happens at evaluation time.

The loop (`hisd_jax/loop.py`) owns what every run shares; a program (`base.Program`) owns the
unit of work and its evaluation-time actions. Programs are chosen by name (`program.name` in
the config) from this registry; the modules are imported lazily, so reading the names (as
config validation does) imports nothing heavy.

  standard        one batch -> one update (programs/standard.py)
  kd_joint        KD from converged tasks, all tasks from the start (programs/kd_converged.py)
  kd_sequential   KD from converged tasks, tasks entering one at a time
  alphavil        αVIL: per-task inner training, α fitted on the target's validation loss
                  (programs/alphavil.py)
  diw             auxiliary examples weighted by a dev-vs-train classifier's density ratio
                  (programs/diw.py)

A new program: a module here with a `Program` subclass, and one line in `_PROGRAMS`.
"""

import importlib

# name -> (module under hisd_jax.programs, class name)
_PROGRAMS = {
    "standard": ("standard", "StandardProgram"),
    "kd_joint": ("kd_converged", "KDJointProgram"),
    "kd_sequential": ("kd_converged", "KDSequentialProgram"),
    "alphavil": ("alphavil", "AlphaVILProgram"),
    "diw": ("diw", "DIWProgram"),
}
PROGRAMS: tuple[str, ...] = tuple(_PROGRAMS)


def register(name: str, cls) -> None:
    """Registers a Program subclass defined outside this package (a notebook, a test file)."""
    global PROGRAMS
    _PROGRAMS[name] = cls
    PROGRAMS = tuple(_PROGRAMS)


def program_class(name: str):
    """The Program subclass registered as `name`; ValueError naming the allowed ones otherwise."""
    if name not in _PROGRAMS:
        raise ValueError(f"program.name={name!r} is not one of {', '.join(_PROGRAMS)}")
    entry = _PROGRAMS[name]
    if isinstance(entry, type):
        return entry
    module, cls = entry
    return getattr(importlib.import_module(f"hisd_jax.programs.{module}"), cls)
