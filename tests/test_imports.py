"""scripts/check_imports.py finds import cycles (lazy imports included) and private-name imports in a package."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
check_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_imports)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": '__version__ = "1"\n', **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _run(root: Path, capsys, *flags: str) -> tuple[int, str]:
    code = check_imports.main([str(root), *flags])
    return code, capsys.readouterr().out


def test_finds_lazy_cycle_and_private_import(tmp_path, capsys):
    root = _package(tmp_path, {
        "a.py": "from . import b\n\nthing = 1\n",  # a -> b: a submodule named in from-import, relative
        "b.py": "def _helper():\n    pass\n\n\ndef f():\n    from pkg.a import thing\n    return thing\n",  # b -> a, lazy
        "c.py": "from pkg import __version__\n",  # a dunder is public; c is in no cycle
        "sub/__init__.py": "",
        "sub/d.py": "from ..b import _helper\n",  # private name of another module, relative two levels up
    })
    code, out = _run(root, capsys)
    assert code == 0
    assert "cycle 1 (2 modules): pkg.a, pkg.b" in out
    assert "private: pkg/sub/d.py:1 imports pkg.b._helper" in out
    assert out.splitlines()[-1] == "cycles: 1 (2 modules), private imports: 1"
    assert _run(root, capsys, "--strict")[0] == 1


def test_clean_package_reads_zero(tmp_path, capsys):
    root = _package(tmp_path, {
        "a.py": "from pkg.b import public\n\n\ndef _own():\n    return public\n",
        "b.py": "import os\n\npublic = 1\n\n\ndef f():\n    from pkg import __version__\n    return __version__\n",
        "c.py": "from pkg import a, b\n",
    })
    code, out = _run(root, capsys, "--strict")
    assert code == 0
    assert out.splitlines()[-1] == "cycles: 0 (0 modules), private imports: 0"
