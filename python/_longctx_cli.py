"""The `longctx` console script. --help and --version are answered without importing torch and
the extension (what `import longctx` does, seconds); every other command runs longctx.cli.main.

For help and version, longctx.cli's parser is loaded from the package's own files under a private
package name, so that longctx/__init__.py does not run; the parser's modules import no torch at
module level. `python -m longctx` imports the package first and so always loads torch.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import List, Optional

_TEXT_ONLY = {"-h", "--help", "--version"}
_LIGHT = "_longctx_light"  # the private package name the parser is loaded under


def _package_dir() -> Optional[Path]:
    """The folder of the installed longctx package, found without importing it."""
    spec = importlib.util.find_spec("longctx")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _version(init_file: Path) -> str:
    """The literal `__version__ = "..."` of longctx/__init__.py."""
    for node in ast.parse(init_file.read_text()).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and any(getattr(t, "id", None) == "__version__" for t in node.targets)):
            return str(node.value.value)
    return "unknown"


def _light_cli() -> Optional[types.ModuleType]:
    """longctx.cli loaded as _longctx_light.cli (longctx/__init__.py not run), or None."""
    folder = _package_dir()
    if folder is None:
        return None
    package = types.ModuleType(_LIGHT)
    package.__path__ = [str(folder)]
    package.__version__ = _version(folder / "__init__.py")
    sys.modules[_LIGHT] = package
    return importlib.import_module(f"{_LIGHT}.cli")


def _drop_light() -> None:
    for name in [n for n in sys.modules if n == _LIGHT or n.startswith(_LIGHT + ".")]:
        del sys.modules[name]


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or _TEXT_ONLY & set(argv):
        cli = _light_cli()
        if cli is not None:
            if not argv:
                return cli.main([])  # the help, exit status 2
            cli.parse_args(cli.build_parser(), argv)  # prints the help, version or error; exits
            _drop_light()  # parsed without exiting: a real command after all
    from longctx.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
