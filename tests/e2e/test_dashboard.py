"""The dashboard in a real browser: Debian's chromium, headless, driven over the DevTools
protocol, showing a cluster of twistd processes and following a server's death.

``make test`` installs chromium when it is missing; without it this test fails, it never
skips.
"""

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import websocket

#: Seconds chromium may take to start, and a page to show what the test waits for.
BROWSER_START = 20.0
PAGE_TIMEOUT = 15.0
#: The page polls every 2 s; the manager sees a killed server's connection close at once.
DEATH_SHOWN_WITHIN = 6.0
DASHBOARD_LISTENING = re.compile(r"sdbackup-manager dashboard on port (\d+)")
DEVTOOLS_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class Browser:
    """A headless chromium and one page of it, over the DevTools protocol."""

    def __init__(self, profile: Path):
        binary = shutil.which("chromium")
        if binary is None:
            pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
        args = [binary, "--headless=new", "--disable-gpu", "--no-first-run",
                "--remote-debugging-port=0", f"--user-data-dir={profile}",
                "--window-size=1100,1300", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.output: list[str] = []
        found = threading.Event()
        self._devtools = None

        def read():
            for line in self.process.stderr:
                self.output.append(line)
                match = DEVTOOLS_LISTENING.search(line)
                if match and self._devtools is None:
                    self._devtools = match.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(BROWSER_START):
            self.close()
            pytest.fail(f"chromium did not start within {BROWSER_START} s:\n{''.join(self.output)}")
        port = re.search(r":(\d+)/", self._devtools).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            page = next(t for t in json.load(reply) if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30)
        self._ids = itertools.count(1)

    def call(self, method: str, **params):
        request_id = next(self._ids)
        self.socket.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == request_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str):
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        """Evaluate ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            # (Until the page has loaded, its elements are missing: not there yet.)
            value = self.evaluate(
                f"(() => {{ try {{ return {expression}; }} catch (e) {{ return null; }} }})()")
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''")
                pytest.fail(f"the page did not show {what} within {timeout} s; it shows:\n{text}")
            time.sleep(0.2)

    def screenshot(self, path: Path):
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self):
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def browser(tmp_path):
    started = Browser(tmp_path / "chromium-profile")
    try:
        yield started
    finally:
        started.close()


#: The servers' rows as the page shows them: address -> state.
SERVER_STATES = """Object.fromEntries([...document.querySelectorAll('#servers tbody tr')].map(
    r => [r.querySelector('.address').textContent, r.querySelector('.state').textContent]))"""


def test_dashboard_shows_the_cluster_and_a_server_death(start_cluster, fast_manager_options,
                                                       browser, tmp_path):
    cluster = start_cluster(manager_options=[
        *fast_manager_options, "--web", "tcp:0:interface=127.0.0.1", "--history-interval", 0.5])
    web_port = int(cluster.manager.wait_for(DASHBOARD_LISTENING).group(1))
    source = tmp_path / "src"
    source.mkdir()
    for i in range(20):
        (source / f"file{i}.txt").write_bytes(os.urandom(2000 + i))
    cluster.backup("--host", "dashboard-host", source, cwd=tmp_path)

    browser.open(f"http://127.0.0.1:{web_port}/")
    browser.wait_for("document.getElementById('snapshot-count').textContent === '1'"
                     " && document.querySelector('#health-healthy b').textContent !== '0'"
                     " && document.querySelector('#health-under b').textContent === '0'",
                     PAGE_TIMEOUT, "the backup's snapshot and healthy chunks")

    assert browser.evaluate(SERVER_STATES) == {s.address: "alive" for s in cluster.servers}
    health = browser.evaluate("[...document.querySelectorAll('#health span b')]"
                              ".map(b => b.textContent)")
    chunks, healthy, under, missing = (int(n) for n in health)
    assert chunks == healthy > 20 and under == missing == 0
    assert "dashboard-host" in browser.evaluate(
        "document.getElementById('chart-snapshots').textContent")
    # Every server's disk: this cluster's chunks / used / free, each a size (none unknown).
    spaces = browser.evaluate("[...document.querySelectorAll('#servers .space')]"
                              ".map(c => c.textContent)")
    assert len(spaces) == 3
    assert all(re.fullmatch(r"[\d.]+ (B|KiB|MiB|GiB|TiB)( / [\d.]+ (B|KiB|MiB|GiB|TiB)){2}", s)
               for s in spaces), spaces
    assert "file0" not in browser.evaluate("document.documentElement.outerHTML")
    browser.screenshot(tmp_path / "dashboard.png")

    victim = cluster.servers[0]
    cluster.kill(victim.process)
    killed = time.monotonic()
    browser.wait_for(f"({SERVER_STATES})[{json.dumps(victim.address)}] === 'dead'",
                     DEATH_SHOWN_WITHIN, f"{victim.address} dead")
    assert time.monotonic() - killed < DEATH_SHOWN_WITHIN
    assert browser.evaluate(SERVER_STATES) == {
        s.address: "dead" if s is victim else "alive" for s in cluster.servers}
    assert browser.evaluate("document.getElementById('servers-alive').textContent") == "2"
    browser.wait_for("[...document.querySelectorAll('#events li')].some("
                     f"li => li.textContent.includes({json.dumps(victim.address + ' died')}))",
                     PAGE_TIMEOUT, "the death in the recent events")
    # The repair puts the dead server's chunks back on the two left: the page follows it.
    browser.wait_for("[...document.querySelectorAll('#events li')].some("
                     "li => li.textContent.includes('repair copied'))"
                     " && document.querySelector('#health-under b').textContent === '0'"
                     f" && document.querySelector('#health-healthy b').textContent === '{chunks}'",
                     PAGE_TIMEOUT, "the repair done and every chunk healthy again")
    browser.screenshot(tmp_path / "dashboard-after-repair.png")
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    # The README's picture is made here: SDBACKUP_DASHBOARD_SCREENSHOT=docs/dashboard.png.
    if os.environ.get("SDBACKUP_DASHBOARD_SCREENSHOT"):
        shutil.copyfile(tmp_path / "dashboard-after-repair.png",
                        os.environ["SDBACKUP_DASHBOARD_SCREENSHOT"])


def test_a_dashboard_beyond_loopback_without_tls_and_a_password_is_refused_at_start(tmp_path):
    done = subprocess.run(
        [Path(sys.executable).parent / "twistd", "-n", "--pidfile=", "sdbackup-manager",
         "--data", tmp_path / "manager_data", "--listen", "tcp:0:interface=127.0.0.1",
         "--web", "tcp:0:interface=0.0.0.0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    assert done.returncode == 1, done
    assert ("not a loopback address" in done.stderr + done.stdout
            and "missing: TLS" in done.stderr + done.stdout), done
    assert not (tmp_path / "manager_data").exists()  # refused before anything started
