"""Experiment configs (ml_collections, big_vision style): `configs/<task>.py:<arg>`.

Each module has `get_config(arg=None)`; `arg` is a comma-separated `key=value` list, e.g.
`configs/listops.py:attention=bigbird,quick`. See `configs/common.py` for the shared layout.
"""
