"""The twistd plugins, as installed here (editable) and as a wheel ships them.

``twisted/plugins/`` has no ``__init__.py``: it is a portion of Twisted's plugin
package, so the wheel must carry ``twisted/plugins/sdbackup_plugins.py`` and never
an ``__init__.py`` that would shadow Twisted's own.
"""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PYTHON = sys.executable
TWISTD = Path(sys.executable).parent / "twistd"
#: The project folder: tests/e2e/ is two levels below it.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60
BUILD_TIMEOUT = 180


def run(args: list, cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def test_twistd_help_lists_both_plugins(tmp_path):
    # Run outside the project, so only the installed plugin path can find them.
    help_text = run([TWISTD, "--help"], cwd=tmp_path).stdout

    for name in ("sdbackup-manager", "sdbackup-server"):
        assert re.search(rf"^\s+{name}\s+\S", help_text, re.MULTILINE), help_text


@pytest.mark.parametrize(("plugin", "options"), [
    ("sdbackup-manager", ["--listen", "--data", "--replicas", "--tls-ca", "--tls-cert", "--tls-key",
                          "--handshake-timeout", "--idle-timeout", "--max-connections"]),
    ("sdbackup-server", ["--listen", "--data", "--manager", "--advertise", "--heartbeat", "--tls-ca",
                         "--tls-cert", "--tls-key", "--max-connections-per-host"]),
])
def test_each_plugin_describes_its_options(tmp_path, plugin, options):
    help_text = run([TWISTD, plugin, "--help"], cwd=tmp_path).stdout

    for option in options:
        assert re.search(rf"^\s+(-\w, )?{option}=", help_text, re.MULTILINE), (option, help_text)
    assert re.search(r"^\s+--insecure\s", help_text, re.MULTILINE), help_text


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from the project with the venv's pip: the non-editable packaging."""
    assert (PROJECT_ROOT / "pyproject.toml").is_file(), PROJECT_ROOT
    out = tmp_path_factory.mktemp("wheel")
    run([PYTHON, "-m", "pip", "wheel", "--no-deps", "-w", out, PROJECT_ROOT], cwd=out,
        timeout=BUILD_TIMEOUT)
    built = list(out.glob("sdbackup-*.whl"))
    assert len(built) == 1, os.listdir(out)
    return built[0]


def test_wheel_ships_the_plugin_and_not_twisted_init_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())

    assert "twisted/plugins/sdbackup_plugins.py" in names
    for module in ("__init__.py", "manager_tap.py", "server_tap.py", "client/cli.py",
                   "services/manager.py", "services/server.py"):
        assert f"sdbackup/{module}" in names, module
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")], "a stale plugin cache is shipped"
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"sdbackup", "twisted"}, tops


FIND_PLUGINS = """
import os, sys
root, site = os.path.realpath(sys.argv[1]), sys.argv[2]
sys.path[:] = [site] + [p for p in sys.path if p and os.path.realpath(p) != root]
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
import importlib
for maker in getPlugins(IServiceMaker):
    if maker.tapname.startswith("sdbackup"):
        print(maker.tapname, importlib.import_module(maker.module).__file__)
"""


def test_the_wheel_alone_provides_the_plugins(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)

    found = run([PYTHON, "-c", FIND_PLUGINS, PROJECT_ROOT, site], cwd=tmp_path).stdout

    modules = dict(line.split(" ", 1) for line in found.splitlines())
    assert sorted(modules) == ["sdbackup-manager", "sdbackup-server"], found
    for path in modules.values():
        assert Path(path).resolve().is_relative_to(site.resolve()), found
