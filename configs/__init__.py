"""Experiment configs, big_vision's manner: each file's ``get_config(arg=None)`` returns an
``ml_collections.ConfigDict``; ``arg`` picks a variant from the command line,
``--config=configs/nsd.py:patch=12``.

This folder installs as the package ``nvl_jax.configs`` (setup.py maps it), so configs import
each other as modules (``from nvl_jax.configs import nsd``) and the default config is found in
a non-editable install, away from the source tree.

List a config's fields, resolved, with ``python -m nvl_jax.train --config=configs/nsd.py
--print_config``.
"""

from __future__ import annotations


def parse_arg(arg: str | None, **defaults):
    """``"patch=12,root=/data"`` -> a ConfigDict of ``defaults`` updated from ``arg``.

    Every key must be one of ``defaults``; each value is converted to the type of its default
    (an int default takes ``"12"``, a bool takes ``true``/``false``).
    """
    import ml_collections

    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, text = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config argument {item!r}: expected KEY=VALUE with KEY one of {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={text!r}: expected true or false")
            values[key] = text.lower() in ("true", "1")
        else:
            values[key] = kind(text) if defaults[key] is not None else text
    return ml_collections.ConfigDict(values)
