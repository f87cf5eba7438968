"""The demo page in a real browser, across a real three-node TLS mesh.

Starts three ``twistd meshd`` nodes (certificates from ``meshctl certs``,
each with its ``[web]`` listener and the demo on), then runs
``tests/browser/demo.test.mjs``: Debian's ``/usr/bin/chromium`` driven by the
npm package ``playwright-core`` (never a browser download). The script
checks chat between pages on two nodes, the failover of a page to another
node when its node stops, and saves ``tests/artifacts/demo.png``.

Skipped when ``/usr/bin/chromium`` or ``node`` is missing. The npm
dependencies are installed with ``npm ci`` in ``tests/browser`` when
``tests/browser/node_modules`` is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from .support import ROOT, NodeProcess, env
from .test_processes import meshctl

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("MESHD_CHROMIUM", "/usr/bin/chromium"))
BROWSER_TESTS = ROOT / "tests" / "browser"
ARTIFACTS = ROOT / "tests" / "artifacts"


def _tools() -> str:
    """The path of ``node``, or skip the test when the browser or node is missing (fail instead when
    ``MESHD_REQUIRE_BROWSER`` is set, as ``.ci/run`` does: there a skip would hide a broken install)."""
    missing = pytest.fail if os.environ.get("MESHD_REQUIRE_BROWSER") else pytest.skip
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is not installed (apt-get install chromium)")
    node = shutil.which("node")
    if node is None:
        missing("node is not installed (apt-get install nodejs npm)")
    return node


def _npm_dependencies() -> None:
    if (BROWSER_TESTS / "node_modules").is_dir():
        return
    npm = shutil.which("npm")
    assert npm is not None, "tests/browser/node_modules is missing and there is no npm to install it (apt-get install npm)"
    result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=BROWSER_TESTS,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"npm ci in tests/browser failed:\n{result.stdout}\n{result.stderr}"


def _cluster_json(node: NodeProcess) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.ports['web']}/demo/cluster.json", timeout=5) as answer:
        return json.load(answer)


def _wait(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


API_KEY = "browser-test-key"
#: n1 (the node that stays up) also has the server HTTP API, for POST /api/notify to the watch panel.
API = f"""
[api]
listen = "tcp:0:interface=127.0.0.1"
keys = {{ test = "{API_KEY}" }}
"""
_API_STARTING = re.compile(r"\] ApiSite starting on (\d+)\n")


def _config(path: Path, index: int, node_id: str, certs: Path, seeds: list[str]) -> None:
    path.write_text(f"""
[node]
id = "{node_id}"
name = "n{index}"
drain_seconds = 0.5

[websocket]
listen = ["tcp:0:interface=127.0.0.1"]

[[rules]]
match = "*"
anonymous = ["subscribe", "publish", "watch"]

[web]
listen = "tcp:0:interface=127.0.0.1"
demo = true

[mesh]
cluster = "demo"
listen = "tcp:0:interface=127.0.0.1"
seeds = {json.dumps(seeds)}
ca = "{certs / 'ca.pem'}"
cert = "{certs / f'n{index}.pem'}"
key = "{certs / f'n{index}.key'}"
heartbeat_interval = 0.3
heartbeat_timeout = 3.0
reconnect_max_delay = 0.5
{API if index == 1 else ""}""")


def _run_script(node_bin: str, spec: Path, timeout: float = 150.0) -> tuple[int, str, str]:
    """Run demo.test.mjs; past ``timeout``, SIGTERM first, so that playwright closes chromium."""
    proc = subprocess.Popen([node_bin, "demo.test.mjs", str(spec)], cwd=BROWSER_TESTS,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        err += f"\n(the script did not finish within {timeout} s)"
        return -1, out, err
    return proc.returncode, out, err


def test_demo_page_chat_and_failover_across_the_mesh(tmp_path: Path) -> None:
    node_bin = _tools()
    _npm_dependencies()

    certs = tmp_path / "certs"
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for args in (["ca", "--dir", str(certs), "--cluster", "demo"],
                 *[["node", f"n{i}", "--dir", str(certs), "--san", "127.0.0.1", "--node-id", ids[i]] for i in range(3)]):
        result = meshctl("certs", *args)
        assert result.returncode == 0, result.stderr

    nodes: list[NodeProcess] = []
    try:
        for i in range(3):
            seeds = [f"127.0.0.1:{nodes[-1].ports['mesh']}"] if nodes else []
            config = tmp_path / f"n{i}.toml"
            _config(config, i, ids[i], certs, seeds)
            run = tmp_path / f"run{i}"
            run.mkdir()
            node = NodeProcess("--config", str(config), cwd=run)
            nodes.append(node)
            node.wait_listening(("websocket", "web", "mesh"))

        def full_mesh() -> bool:
            return all(sum(p["link"] == "open" for p in _cluster_json(n)["info"]["mesh"]["peers"]) == 2 for n in nodes)

        _wait(full_mesh, "a full mesh of three nodes")
        api_port = _API_STARTING.findall(nodes[1].output())
        assert api_port, f"n1 did not log its API listener: {nodes[1].output()}"

        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({
            "nodes": [{"name": f"n{i}", "id": ids[i], "ws": n.ports["websocket"], "web": n.ports["web"], "pid": n.proc.pid}
                      for i, n in enumerate(nodes)],
            "api": {"node": 1, "port": int(api_port[0]), "key": API_KEY},
            "artifacts": str(ARTIFACTS),
            "chromium": str(CHROMIUM),
        }))
        returncode, out, err = _run_script(node_bin, spec)
        print(out)
        if returncode != 0:
            logs = "\n".join(f"--- n{i} log (tail) ---\n{n.output()[-3000:]}" for i, n in enumerate(nodes))
            pytest.fail(f"the browser test failed ({returncode}):\n{out}\n{err}\n{logs}", pytrace=False)
        assert (ARTIFACTS / "demo.png").stat().st_size > 10_000
        # n0 was stopped by the script with SIGTERM: it drained its sessions (4007), then exited on the signal.
        assert nodes[0].proc.wait(15) == -signal.SIGTERM, nodes[0].output()[-3000:]
        assert "Draining 1 sessions" in nodes[0].output()
    finally:
        for node in nodes:
            node.stop()


def _readme_demo_command() -> list[str]:
    """The node command of README.md's "Run a node", after its install steps."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Run a node"):]
    line = re.search(r"```sh\n(.+?)\n```", block, re.S).group(1)
    command = line.split(" && ")[-1]
    assert command == ".venv/bin/twistd -n meshd --demo", command
    return command.split()


def test_readme_command_ends_in_a_browser(tmp_path: Path) -> None:
    """A node started exactly as the README says prints the demo page's URL, and the page works there:
    it connects, joins a room, and shows what this page and meshctl send."""
    node_bin = _tools()
    _npm_dependencies()
    argv = _readme_demo_command()
    node = subprocess.Popen([str(ROOT / argv[0]), *argv[1:]], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    script = None
    try:
        url = None
        deadline = time.monotonic() + 30
        seen = ""
        while url is None and time.monotonic() < deadline and node.poll() is None:
            line = node.stdout.readline()
            seen += line
            found = re.search(r"Demo page: open (http://\S+) in a browser", line)
            url = found.group(1) if found else None
        assert url == "http://localhost:8766/", f"the node printed no demo URL (the ports may be in use):\n{seen}"
        ARTIFACTS.mkdir(exist_ok=True)
        script = subprocess.Popen([node_bin, "readme.test.mjs", url, str(CHROMIUM), str(ARTIFACTS), "from meshctl"],
                                  cwd=BROWSER_TESTS, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert script.stdout.readline().strip() == "ready", script.communicate(timeout=30)
        result = meshctl("pub", "chat.lobby", json.dumps({"from": "cli", "text": "from meshctl"}))
        assert result.returncode == 0, result.stderr
        out, err = script.communicate("published\n", timeout=60)
        assert script.returncode == 0 and out.strip() == "ok", f"{out}\n{err}"
    finally:
        for proc in (script, node):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
