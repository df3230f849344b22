"""Inverse-problem methods: every module of this package registers its methods with
``@register_method`` on import; all (not starting with ``_``) are imported here, so a new method
module needs no other edit. See :func:`~sde_diffusion.inverse.available_methods`."""
import importlib as _importlib
import pkgutil as _pkgutil

for _module in _pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_module.name}")
