"""`lens.models`: the `models/` folder under a name that a user's own `models` cannot shadow.

Research projects very often have a `models.py` or `models/` of their own, and other
distributions install a top-level `models` package; whichever comes first on `sys.path` would
win an `import models`.  So nothing in `lens` imports the top-level name: the ports live in the
checkout's `models/` folder (the design card's layout) and are imported as `lens.models`, loaded
here from that folder by path.  Inside `models/` every import is relative.

    from lens import models            # always this package, whatever else is called `models`

`import models` from the checkout (or after `pip install -e .`, when nothing else of that name
comes first) still works and gives the very same module objects: the top-level name is an alias
of `lens.models` (one copy of every class, so `isinstance` and JAX's pytree registry agree).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import pathlib
import sys

CANONICAL = "lens.models"
TOP_LEVEL = "models"


def models_folder() -> pathlib.Path:
    """The `models/` package folder: beside `lens/` in a checkout or an editable install,
    inside it (`lens/models`) in a wheel that maps it there."""
    here = pathlib.Path(__file__).resolve().parent
    for folder in (here / "models", here.parent / "models"):
        if (folder / "core" / "block.py").is_file():
            return folder
    raise ImportError(
        f"lens.models: no models/ package beside or inside {here} (expected models/core/block.py); "
        "install lens from its checkout (`pip install -e .`) or put the checkout on PYTHONPATH")


def register():
    """Import `models/` as `lens.models` (once) and return it."""
    if CANONICAL in sys.modules:
        return sys.modules[CANONICAL]
    folder = models_folder()
    spec = importlib.util.spec_from_file_location(
        CANONICAL, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[CANONICAL] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(CANONICAL, None)
        raise
    return module


class _TopLevelAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`models.x.y` -> the already (or newly) imported `lens.models.x.y`, the same object."""

    def __init__(self):
        self._specs = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(TOP_LEVEL + ".") and sys.modules.get(TOP_LEVEL) is sys.modules.get(CANONICAL):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module("lens." + spec.name)
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # The import system stamped the alias spec on the module: give it its own back.
        for name, spec in list(self._specs.items()):
            if spec is not None and spec.name == module.__name__:
                module.__spec__ = self._specs.pop(name)


def alias_top_level():
    """Make `import models` (and `models.x.y`) resolve to `lens.models` (called by models/__init__
    when it is imported under its folder's name)."""
    module = register()
    if not any(isinstance(f, _TopLevelAlias) for f in sys.meta_path):
        sys.meta_path.insert(0, _TopLevelAlias())
    sys.modules[TOP_LEVEL] = module
    return module
