"""The bundled recipes, shipped in the wheel as `qlora_cli.configs` (data only, nothing to import).

This file exists for editable installs: setuptools' editable finder only resolves a package mapped to a
folder outside its parent (`qlora_cli.configs` -> `configs/`) when that folder has an `__init__.py`
(pypa/setuptools#4943), and `importlib.resources.files()` then gives a plain `pathlib.Path`.
"""
