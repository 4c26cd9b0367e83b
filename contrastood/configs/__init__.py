"""Experiment configs, `get_config(arg)` in each module (configs/ at the top of the repository links here).

The variant argument after the path's colon is typed by `config_lib.parse_arg`, e.g.
`configs/cifar10.py:cpu` or `configs/cifar10.py:cpu,width=2`.
"""
