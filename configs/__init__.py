"""Experiment configs (installed as `contrastood.configs`): `get_config(arg)` in each module.

The variant argument after the path's colon is typed by `config_lib.parse_arg`, e.g.
`configs/cifar10.py:cpu` or `configs/cifar10.py:cpu,width=2`.
"""
