"""The client's public surface: __all__ is honest, the error tree is exported, stdlib only."""

from __future__ import annotations

import inspect
import subprocess
import sys

import managerd_client
from managerd_client import errors


def test_all_names_exist_and_are_exported() -> None:
    assert sorted(managerd_client.__all__) == sorted(set(managerd_client.__all__))
    for name in managerd_client.__all__:
        assert hasattr(managerd_client, name), name
    public = {n for n in dir(managerd_client) if not n.startswith("_")}
    modules = {"channel", "client", "errors", "pipeline", "proxies", "wire"}
    assert public - modules - {"annotations"} == set(managerd_client.__all__)


def test_every_error_is_exported_and_under_the_root() -> None:
    classes = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == errors.__name__
    }
    assert classes <= set(managerd_client.__all__)
    assert classes <= set(errors.__all__)
    for name in classes:
        assert issubclass(getattr(errors, name), errors.ManagerdError)


def test_the_docstring_tree_names_every_error() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        if name[0].isupper():
            assert name in doc, f"{name} is missing from the tree in errors.py"


def test_importing_the_client_pulls_in_no_third_party_module() -> None:
    code = (
        "import sys, sysconfig, managerd_client, os\n"
        "std = sysconfig.get_paths()['stdlib']\n"
        "pkg = os.path.dirname(managerd_client.__file__)\n"
        "bad = [n for n, m in list(sys.modules.items())\n"
        "       if getattr(m, '__file__', None) and not m.__file__.startswith((std, pkg))]\n"
        "print(bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
