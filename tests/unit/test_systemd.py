"""The systemd units in contrib/systemd/: each ExecStart is a twistd command line that twistd
itself accepts, with the plugin's own options, so a unit with a typo fails here, not at boot.

The command line is parsed by twistd's ``ServerOptions`` with the sdbackup plugins loaded (no
process is started). The unit's state folder (its ``WorkingDirectory``) is mapped to a
temporary folder first: a storage server's options take the data folder's lock.
"""

import shlex
from pathlib import Path

import pytest
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
#: The port the test gives a template unit as its instance.
INSTANCE = "5001"
#: (unit file, the plugin its ExecStart runs)
EXPECTED = [("sdbackup-manager.service", "sdbackup-manager"),
            ("sdbackup-server@.service", "sdbackup-server")]


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values]}}``, with continued lines (``\\`` at the end) joined and
    comments dropped, as systemd reads a unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    assert not pending, f"{path.name}: ends with a continued line"
    return sections


def specifiers(text: str, instance: str) -> str:
    """systemd's ``%i``/``%I`` (the instance) and ``%%``; any other specifier fails the test."""
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char != "%":
            out.append(char)
            index += 1
            continue
        spec = text[index + 1 : index + 2]
        assert spec in ("i", "I", "%"), f"unexpected specifier %{spec} in {text!r}"
        out.append("%" if spec == "%" else instance)
        index += 2
    return "".join(out)


def unit_and_argv(name: str) -> tuple[dict, list[str]]:
    unit = read_unit(UNITS / name)
    service = unit["Service"]
    assert len(service["ExecStart"]) == 1, service["ExecStart"]
    argv = shlex.split(specifiers(service["ExecStart"][0], INSTANCE))
    return unit, argv


def parse_twistd(argv: list[str], state: str, tmp_path: Path) -> ServerOptions:
    """twistd's own parse of ``argv[1:]``, the state folder mapped to ``tmp_path``."""
    assert Path(argv[0]).name == "twistd", argv[0]
    mapped = [arg.replace(state, str(tmp_path)) for arg in argv[1:]]
    options = ServerOptions()
    options.parseOptions(mapped)
    return options


def test_the_units_are_the_two_expected():
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(name for name, _ in EXPECTED)


@pytest.mark.parametrize(("name", "plugin"), EXPECTED)
def test_execstart_is_a_valid_twistd_invocation_of_the_plugin(name, plugin, tmp_path, monkeypatch):
    unit, argv = unit_and_argv(name)
    state = unit["Service"]["WorkingDirectory"][0]
    monkeypatch.chdir(tmp_path)

    options = parse_twistd(argv, state, tmp_path)

    assert options.subCommand == plugin
    # In the foreground, no pid file: systemd (Type=simple) tracks the process itself.
    assert options["nodaemon"] and not options["pidfile"]
    assert unit["Service"]["Type"] == ["simple"]
    listen = options.subOptions["listen"]
    assert listen.endswith(":interface=127.0.0.1"), listen
    if plugin == "sdbackup-server":
        assert listen == f"tcp:{INSTANCE}:interface=127.0.0.1"
        assert options.subOptions["data"] == str(tmp_path / f"data_{INSTANCE}")
        assert options.subOptions["advertise"] == f"tcp:127.0.0.1:{INSTANCE}"


@pytest.mark.parametrize(("name", "plugin"), EXPECTED)
def test_a_typo_in_the_command_line_is_refused(name, plugin, tmp_path, monkeypatch):
    """What the test above relies on: twistd refuses an option its plugin does not have."""
    unit, argv = unit_and_argv(name)
    state = unit["Service"]["WorkingDirectory"][0]
    monkeypatch.chdir(tmp_path)
    typo = [arg.replace("--listen", "--lisen") for arg in argv]

    with pytest.raises(usage.UsageError, match="lisen"):
        parse_twistd(typo, state, tmp_path)


@pytest.mark.parametrize(("name", "plugin"), EXPECTED)
def test_runs_unprivileged_and_writes_only_its_state_folder(name, plugin):
    unit, argv = unit_and_argv(name)
    service = unit["Service"]
    assert service["User"] == ["sdbackup"] and service["Group"] == ["sdbackup"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["CapabilityBoundingSet"] == [""]
    writable = service["ReadWritePaths"][0].split()
    data = argv[argv.index("--data") + 1]
    assert any(Path(data).is_relative_to(folder) for folder in writable), (data, writable)
    assert Path(data).is_relative_to(service["WorkingDirectory"][0])
