"""Start-up checks: ``--check-config``, ``meshctl check-config``, one-line refusals, versions, log fields."""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import pytest
from twisted.internet.error import CannotListenError
from twisted.logger import LogPublisher, Logger
from twisted.trial import unittest

import meshd
from meshd.config import Config, load
from meshd.logs import NodeFields
from meshd.mesh.certs import create_ca, issue_node
from meshd.tap import Options, Refused, check_file, startup_problem

from .meshsupport import certified_id, make_certs
from .support import BIN, ROOT, NodeProcess, env

slow = pytest.mark.slow


def example_config() -> str:
    """The example configuration of docs/configuration.md, as written there."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text[text.index("## Example"):]
    return re.search(r"```toml\n(.*?)```", section, re.S).group(1)


def write_extension(directory: Path) -> Path:
    """The package the example names, ``myapp.meshd_extension``, with a setup(app) that does nothing."""
    (directory / "myapp").mkdir(parents=True, exist_ok=True)
    (directory / "myapp" / "__init__.py").write_text("")
    (directory / "myapp" / "meshd_extension.py").write_text("def setup(app):\n    pass\n")
    return directory


class CheckTestCase(unittest.TestCase):
    def write(self, text: str, name: str = "meshd.toml") -> Path:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        path = directory / name
        path.write_text(text)
        return path.resolve()

    def mesh_file(self, node_id: str = "", **paths: str) -> Path:
        """A configuration with a [mesh] section whose certificates are made for it (node n1)."""
        directory = Path(self.mktemp()).resolve()
        make_certs(directory / "certs", ["n1"])
        files = {"ca": "certs/ca.pem", "cert": "certs/n1.pem", "key": "certs/n1.key", **paths}
        node = f'[node]\nid = "{node_id}"\n' if node_id else ""
        path = directory / "n1.toml"
        path.write_text(
            node + '[mesh]\ncluster = "test"\nlisten = "tcp:0:interface=127.0.0.1"\n'
            + "".join(f'{key} = "{value}"\n' for key, value in files.items())
        )
        return path


class CheckFileTests(CheckTestCase):
    def test_every_bad_key_in_one_pass(self) -> None:
        """Each bad key of a file is one problem naming the file and the key, all found in one pass."""
        path = self.write(
            "[limits]\nmax_subscriptions = 'lots'\nmax_watches = 0\n"
            "[websocket]\nport = 1\n[nodes]\nx = 1\n[[rules]]\nmatch = ''\n"
        )
        problems = check_file(path)
        self.assertEqual(
            [p.split(": ")[1] for p in problems],
            ["limits.max_subscriptions", "limits.max_watches", "unknown key websocket.port (known", "unknown section [nodes] (known", "rules[0].match"],
        )
        self.assertTrue(all(p.startswith(f"{path}: ") for p in problems), problems)

    def test_unreadable_and_not_toml(self) -> None:
        """A file that cannot be read, or is not TOML, is one problem."""
        self.assertEqual(len(check_file("/nonexistent/meshd.toml")), 1)
        self.assertIn("not valid TOML", check_file(self.write("[websocket\n"))[0])

    def test_good_file(self) -> None:
        """A file the node would start with has no problems."""
        self.assertEqual(check_file(self.write('[websocket]\nlisten = ["tcp:0:interface=127.0.0.1"]\n')), [])

    def test_listeners(self) -> None:
        """A port out of range, a UNIX socket in a missing directory and an ssl: key that cannot be read are named by key."""
        problems = check_file(self.write(
            '[websocket]\nlisten = ["tcp:99999", "unix:/nonexistent/dir/meshd.sock"]\n'
            '[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n'
        ))
        self.assertEqual([p.split(": ")[1] for p in problems], ["websocket.listen", "websocket.listen"])
        self.assertIn("out of range", problems[0])
        self.assertIn("/nonexistent/dir", problems[1])
        problems = check_file(self.write('[websocket]\nlisten = ["ssl:0:privateKey=missing.pem"]\n'))
        self.assertEqual(len(problems), 1)
        self.assertIn("websocket.listen", problems[0])

    def test_extension_modules(self) -> None:
        """An extension module that cannot be imported, or has no setup(app), is named with extensions.modules."""
        problems = check_file(self.write('[extensions]\nmodules = ["no_such_module_here", "json", "tests.extension_for_tests"]\n'))
        self.assertEqual(len(problems), 2, problems)
        self.assertIn("extensions.modules: cannot import extension module 'no_such_module_here'", problems[0])
        self.assertIn("extensions.modules: extension module 'json' has no setup(app)", problems[1])

    def test_mesh_certificates(self) -> None:
        """Unreadable certificates, and a node id other than the certificate's, are named by key."""
        path = self.mesh_file(key="certs/missing.key")
        self.assertEqual(check_file(path), [f"{path}: mesh.key: cannot read {path.parent / 'certs/missing.key'}: No such file or directory"])
        path = self.mesh_file()
        named = certified_id(path.parent / "certs" / "n1.pem")
        self.assertEqual(
            check_file(path),
            [f'{path}: node.id: not set, but mesh.cert is the certificate of node {named}: set [node] id = "{named}"'],
        )
        other = self.mesh_file(node_id=str(uuid4()))
        problems = check_file(other)
        self.assertEqual(len(problems), 1)
        self.assertIn(f"{other}: mesh.cert is the certificate of node", problems[0])
        path = self.mesh_file(node_id="")
        text = path.read_text()
        named = certified_id(path.parent / "certs" / "n1.pem")
        path.write_text(f'[node]\nid = "{named}"\n' + text)
        self.assertEqual(check_file(path), [])

    def test_certificate_of_another_cluster(self) -> None:
        """A node certificate the configured CA did not sign, or a key of another certificate, is refused."""
        path = self.mesh_file()
        certs = path.parent / "certs"
        named = certified_id(certs / "n1.pem")
        other = certs / "other"
        create_ca(other, "other")
        issue_node(other, "n1", ["127.0.0.1"], node_id=named)
        path.write_text(f'[node]\nid = "{named}"\n' + path.read_text().replace("certs/n1.pem", "certs/other/n1.pem")
                        .replace("certs/n1.key", "certs/other/n1.key"))
        self.assertEqual(check_file(path), [f"{path}: mesh.cert: {other / 'n1.pem'} is not signed by the cluster CA in mesh.ca ({certs / 'ca.pem'})"])
        path.write_text(path.read_text().replace("certs/other/n1.key", "certs/n1.key"))
        problems = check_file(path)
        self.assertEqual(len(problems), 1)
        self.assertIn("mesh.cert, mesh.key", problems[0])

    def test_expired_certificate(self) -> None:
        """An expired node certificate is named."""
        path = self.mesh_file()
        certs = path.parent / "certs"
        named = certified_id(certs / "n1.pem")
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
        issue_node(certs, "old", ["127.0.0.1"], node_id=named, not_before=past, not_after=past + datetime.timedelta(days=1))
        path.write_text(f'[node]\nid = "{named}"\n' + path.read_text().replace("n1.", "old."))
        problems = check_file(path)
        self.assertEqual(len(problems), 1)
        self.assertIn("mesh.cert:", problems[0])
        self.assertIn("expired", problems[0])

    def test_documented_example(self) -> None:
        """The example configuration in docs/configuration.md passes the checks, its extension module present."""
        path = self.write(example_config())
        sys.path.insert(0, str(write_extension(path.parent)))
        self.addCleanup(sys.path.remove, str(path.parent))
        self.addCleanup(sys.modules.pop, "myapp.meshd_extension", None)
        self.addCleanup(sys.modules.pop, "myapp", None)
        self.assertEqual(check_file(path), [])
        config = load(path)
        self.assertEqual((config.node_name, config.modules), ("edge-1", ("myapp.meshd_extension",)))


class OptionsTests(CheckTestCase):
    def test_flags_are_checked_with_the_file(self) -> None:
        """--module and --node-id are checked with the file, each problem naming the flag or the key."""
        path = self.mesh_file()
        named = certified_id(path.parent / "certs" / "n1.pem")
        with self.assertRaises(Refused) as caught:
            Options().parseOptions(["--config", str(path), "--module", "no_such_module_here", "--node-id", str(uuid4())])
        problems = caught.exception.problems
        self.assertEqual(len(problems), 2, problems)
        self.assertTrue(problems[0].startswith("--module: cannot import"), problems)
        self.assertIn(f'set [node] id = "{named}"', problems[1])
        options = Options()
        options.parseOptions(["--config", str(path), "--node-id", str(named)])
        self.assertEqual(options["config_object"].node_id, named)

    def test_startup_problem_names_the_listener(self) -> None:
        """A port that cannot be bound is told as one line naming its key."""
        config = Config(source=Path("n.toml"), listen=("tcp:8765:interface=127.0.0.1",), metrics_listen="tcp:9108")
        busy = CannotListenError("127.0.0.1", 9108, OSError(98, "Address already in use"))
        self.assertEqual(
            startup_problem(config, busy),
            "n.toml: metrics.listen: cannot listen on 'tcp:9108' (127.0.0.1:9108): Address already in use",
        )


class LogFieldsTests(unittest.TestCase):
    def test_events_carry_node_id_and_name(self) -> None:
        """Once installed, every event published carries the node's id and name, and its own fields win."""
        publisher, seen = LogPublisher(), []
        node_id = uuid4()
        NodeFields(node_id, "edge-1").install(publisher)
        publisher.addObserver(seen.append)
        log = Logger(observer=publisher)
        log.info("hello")
        log.info("mine", node_name="explicit")
        self.assertEqual([(e["node_id"], e["node_name"]) for e in seen], [(str(node_id), "edge-1"), (str(node_id), "explicit")])


class VersionTests(unittest.TestCase):
    def test_one_version(self) -> None:
        """meshd.__version__ is pyproject.toml's version."""
        pyproject = (ROOT / "pyproject.toml").read_text()
        self.assertEqual(meshd.__version__, re.search(r'(?m)^version = "([^"]+)"', pyproject).group(1))

    def test_license(self) -> None:
        """The LICENSE file is the MIT license pyproject.toml declares, by the meshd authors."""
        text = (ROOT / "LICENSE").read_text()
        self.assertTrue(text.startswith("MIT License"))
        self.assertIn("the meshd authors", text)
        self.assertIn('license = "MIT"', (ROOT / "pyproject.toml").read_text())


# -- real processes ---------------------------------------------------------------


def run(*argv: str, cwd: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True,
                          text=True, timeout=60)


def twistd(*args: str, cwd: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return run(str(BIN / "twistd"), "-n", "--pidfile=", "meshd", *args, cwd=cwd, extra_env=extra_env)


@slow
class ProcessCheckTests(CheckTestCase):
    def assertOneLineRefusal(self, result: subprocess.CompletedProcess, *words: str) -> None:
        out = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, out)
        self.assertNotIn("Traceback", out)
        self.assertNotIn("Usage:", out)
        for word in words:
            self.assertIn(word, out)

    def test_check_config_flag(self) -> None:
        """twistd meshd --check-config exits 1 with one line per problem, or 0 without starting the node."""
        bad = self.write("[limits]\nmax_subscriptions = 'lots'\nmax_watches = 0\n")
        result = twistd("--check-config", "--config", str(bad), cwd=bad.parent)
        self.assertOneLineRefusal(result)
        self.assertEqual(result.stderr.splitlines(), [
            f"{bad}: limits.max_subscriptions: expected an integer >= 1, got 'lots'",
            f"{bad}: limits.max_watches: expected an integer >= 1, got 0",
        ])
        port = socket.socket()
        self.addCleanup(port.close)
        port.bind(("127.0.0.1", 0))
        port.listen()  # busy: --check-config does not listen, so it does not notice
        good = self.write(f'[websocket]\nlisten = ["tcp:{port.getsockname()[1]}:interface=127.0.0.1"]\n')
        result = twistd("--check-config", "--config", str(good), cwd=good.parent)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, f"{good}: OK\n", ""))
        self.assertEqual(sorted(p.name for p in good.parent.iterdir()), ["meshd.toml"])

    def test_meshctl_check_config(self) -> None:
        """meshctl check-config FILE exits 1 with one line per problem on standard error, or 0."""
        bad = self.write("[websocket]\nlisten = ['tcp:99999']\nmax_message_size = 1\n")
        result = run(str(BIN / "meshctl"), "check-config", str(bad), cwd=bad.parent)
        self.assertOneLineRefusal(result, f"{bad}: websocket.max_message_size")
        self.assertEqual(len(result.stderr.splitlines()), 1)
        path = self.mesh_file()
        result = run(str(BIN / "meshctl"), "check-config", str(path), cwd=path.parent)
        self.assertOneLineRefusal(result, f"{path}: node.id: not set, but mesh.cert is the certificate of node")
        good = self.write("")
        result = run(str(BIN / "meshctl"), "check-config", str(good), cwd=good.parent)
        self.assertEqual((result.returncode, result.stdout), (0, f"{good}: OK\n"))

    def test_refusals_at_start_are_one_line(self) -> None:
        """A bad value, a missing extension module, an unreadable certificate or another node's certificate stop twistd with one line."""
        cases = [
            (self.write("[limits]\nmax_subscriptions = 'lots'\n"), "limits.max_subscriptions: expected an integer"),
            (self.write('[extensions]\nmodules = ["no_such_module_here"]\n'),
             "extensions.modules: cannot import extension module 'no_such_module_here'"),
            (self.mesh_file(cert="certs/missing.pem"), "mesh.cert: cannot read"),
            (self.mesh_file(node_id=str(uuid4())), "mesh.cert is the certificate of node"),
        ]
        for path, words in cases:
            result = twistd("--config", str(path), cwd=path.parent)
            self.assertOneLineRefusal(result, f"twistd meshd: {path}: {words}")
            self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
            self.assertEqual(result.stdout, "")

    def test_failing_extension_is_one_line(self) -> None:
        """An extension whose setup(app) raises stops twistd with one line naming the module, where and what."""
        path = self.write('[extensions]\nmodules = ["broken_extension"]\n')
        (path.parent / "broken_extension.py").write_text("def setup(app):\n    raise ValueError('no database')\n")
        result = twistd("--config", str(path), cwd=path.parent,
                        extra_env={"PYTHONPATH": f"{path.parent}{os.pathsep}{env()['PYTHONPATH']}"})
        self.assertOneLineRefusal(result, f"twistd meshd: {path}: extensions.modules: broken_extension: "
                                          "setup(app) failed at broken_extension.py:2: ValueError: no database")
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)

    def test_busy_port_is_one_line(self) -> None:
        """A WebSocket port in use stops the node with one log line naming websocket.listen, and exit status 1."""
        port = socket.socket()
        self.addCleanup(port.close)
        port.bind(("127.0.0.1", 0))
        port.listen()
        endpoint = f"tcp:{port.getsockname()[1]}:interface=127.0.0.1"
        path = self.write(f'[websocket]\nlisten = ["{endpoint}"]\n')
        result = twistd("--config", str(path), cwd=path.parent)
        self.assertOneLineRefusal(result, f"Cannot start: {path}: websocket.listen: cannot listen on '{endpoint}'")
        self.assertIn("Address already in use", result.stdout)

    def test_versions(self) -> None:
        """twistd meshd --version and meshctl --version print meshd's version."""
        cwd = Path(self.mktemp())
        cwd.mkdir()
        plugin = run(str(BIN / "twistd"), "meshd", "--version", cwd=cwd)
        self.assertEqual(plugin.returncode, 0, plugin.stderr)
        self.assertTrue(plugin.stdout.startswith(f"meshd {meshd.__version__} (Twisted "), plugin.stdout)
        ctl = run(str(BIN / "meshctl"), "--version", cwd=cwd)
        self.assertEqual((ctl.returncode, ctl.stdout), (0, f"meshd {meshd.__version__}\n"))

    def test_documented_example_starts(self) -> None:
        """A node starts with the example of docs/configuration.md (its ports made free ones), its name in the log."""
        text = example_config().replace("tcp:8765:interface=0.0.0.0", "tcp:0:interface=127.0.0.1")
        text = text.replace("tcp:9108:interface=127.0.0.1", "tcp:0:interface=127.0.0.1")
        path = self.write(text)
        write_extension(path.parent)
        old = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path.parent), old]))
        self.addCleanup(os.environ.__setitem__, "PYTHONPATH", old)
        node = NodeProcess("--config", str(path), cwd=path.parent)
        self.addCleanup(node.stop)
        node.wait_listening(("websocket", "metrics"))
        self.assertRegex(node.output(), r"meshd node [0-9a-f-]{36} \(edge-1\) starting")
