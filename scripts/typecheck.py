"""mypy over the whole source tree, with the package-dir mapping of pyproject.toml applied.

The folders export/, serve/ and cli/ install as dmt_jepa.export, dmt_jepa.serve and dmt_jepa.cli
([tool.setuptools.package-dir]), which mypy cannot read: it finds a module only at the path its
name spells. So this builds that path, build/typecheck/dmt_jepa/, out of links to the real files
(the one package as it installs), runs mypy on it and on the scripts and tests beside it with the
settings of [tool.mypy], and prints every finding at its real path (serve/job/loop.py, not the link).

    python scripts/typecheck.py              # the whole tree, as CI runs it
    python scripts/typecheck.py --no-incremental   # flags are passed on to mypy
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # mypy itself depends on tomli before 3.11
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

ROOT = Path(__file__).resolve().parents[1]
VIEW = ROOT / "build" / "typecheck"
PACKAGE = "dmt_jepa"
# Checked as scripts and test modules (their own top-level names), beside the package.
LOOSE = ("tests", "benchmarks", "scripts", "hubconf.py")


def package_dirs() -> dict[str, Path]:
    """Import name -> source folder, from pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def build_view(dirs: dict[str, Path]) -> dict[Path, Path]:
    """build/typecheck/<the package as installed>, made of links; returns link prefix -> real folder."""
    prefixes: dict[Path, Path] = {}
    for name in sorted(dirs, key=lambda n: n.count(".")):  # dmt_jepa before dmt_jepa.serve
        view = VIEW.joinpath(*name.split("."))
        view.mkdir(parents=True, exist_ok=True)
        mapped = {n.rpartition(".")[2] for n in dirs if n.rpartition(".")[0] == name}
        wanted = {entry.name for entry in dirs[name].iterdir() if entry.name != "__pycache__"} - mapped
        for link in view.iterdir():  # links to files removed or renamed since the last run
            if link.is_symlink() and (link.name not in wanted or not link.exists()):
                link.unlink()
        for entry in wanted:
            if not (view / entry).is_symlink():
                (view / entry).symlink_to(dirs[name] / entry)
        prefixes[view] = dirs[name]
    return prefixes


def real_path(line: str, prefixes: dict[Path, Path]) -> str:
    """A mypy output line with a path inside the view rewritten to the file it links to."""
    path, sep, rest = line.partition(":")
    if not sep:
        return line
    absolute = (ROOT / path).absolute()
    for view, real in sorted(prefixes.items(), key=lambda item: -len(item[0].parts)):
        if absolute.is_relative_to(view):
            return f"{os.path.relpath(real / absolute.relative_to(view))}{sep}{rest}"
    return line


def main(argv: list[str]) -> int:
    from mypy import api

    prefixes = build_view(package_dirs())
    loose = [name for name in LOOSE if (ROOT / name).exists()]
    os.chdir(ROOT)
    env = os.environ.get("MYPYPATH")
    # tests/ too: the test modules import their helpers (embed_helpers, ...) as top-level modules.
    os.environ["MYPYPATH"] = os.pathsep.join([str(VIEW), str(ROOT / "tests"), *([env] if env else [])])
    # The package through the view; with explicit package bases a test is its own top-level module
    # (tests/ is a base) and a benchmark is benchmarks.NAME, as the tests import them.
    view = os.path.relpath(VIEW / PACKAGE)
    stdout, stderr, status = api.run(["--explicit-package-bases", *argv, view, *loose])
    for line in stdout.splitlines():
        print(real_path(line, prefixes))
    sys.stderr.write(stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
