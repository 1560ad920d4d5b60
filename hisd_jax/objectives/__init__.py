"""Losses: the HiSD loss and its presets (`hisd.py`), KD losses (`distill.py`), and the
training objective over the (task x exit) grid built from a config (`objective.py`)."""
