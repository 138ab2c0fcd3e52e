"""Every public name minifast exports says what it is: `help()` and editors show the docstring, not only the site."""
import importlib, inspect, pkgutil

import pytest

import minifast

MODULES = [m.name for m in pkgutil.iter_modules(minifast.__path__) if not m.name.startswith('_')]


@pytest.mark.parametrize('module_name', MODULES)
def test_every_exported_class_and_function_has_a_docstring(module_name):
    module = importlib.import_module(f'minifast.{module_name}')
    missing = [name for name in module.__all__
               if (inspect.isclass(obj := getattr(module, name)) or inspect.isfunction(obj)) and not (obj.__doc__ or '').strip()]
    assert not missing, f'minifast.{module_name}: no docstring on {missing}'
