"""Registries that a new module joins by defining one name: the backbone families (models/backbones/)
and the dataset kinds (datasets/) are the modules of their folder that define ``FAMILY`` or ``KIND``."""
import importlib
import pkgutil
from typing import Sequence


def discover(package: str, paths: Sequence[str], attributes: Sequence[str], skip: Sequence[str] = ()) -> list:
    """The values of ``attributes`` in the modules of ``package`` found in ``paths``, in the order of the
    modules' names (a tuple or list value is taken item by item); modules named in ``skip`` and those
    without the attributes add nothing."""
    found = []
    for info in sorted(pkgutil.iter_modules(paths), key=lambda m: m.name):
        if info.name in skip:
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for attribute in attributes:
            value = getattr(module, attribute, None)
            found += list(value) if isinstance(value, (list, tuple)) else [value] if value is not None else []
    return found
