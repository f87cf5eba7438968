"""The node's log: ``--log-format text|json`` and ``--log-level``, in-process and from a real ``twistd``."""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path
from uuid import uuid4

import pytest
from twisted.logger import LogLevel, Logger, LogPublisher, eventFromJSON, formatEvent
from twisted.trial import unittest

from meshd import logs
from meshd.tap import Options, Refused

from .support import BIN, env


class ObserverTests(unittest.TestCase):
    def publish(self, observer) -> Logger:
        publisher = LogPublisher(observer)
        logs.NodeFields(self.node, "alpha").install(publisher)
        publisher.removeObserver(observer)
        publisher.addObserver(observer)  # after NodeFields, as under twistd
        return Logger(namespace="meshd.test", observer=publisher)

    def setUp(self) -> None:
        self.node = uuid4()

    def test_json_is_one_object_a_line(self) -> None:
        """The json observer writes each event as one line of Twisted's eventAsJSON, with the node's fields."""
        out = io.StringIO()
        log = self.publish(logs.observer(out, "json", "info"))
        log.info("Linked with {node} at {address}", node=self.node, address="10.0.0.2:7946")
        log.warn("two\nlines")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first = json.loads(lines[0])
        self.assertEqual(first["node_id"], str(self.node))
        self.assertEqual(first["node_name"], "alpha")
        self.assertEqual(first["node"], str(self.node), "UUID fields are strings")
        self.assertEqual(first["log_text"], f"Linked with {self.node} at 10.0.0.2:7946")
        self.assertEqual(formatEvent(eventFromJSON(lines[0])), first["log_text"])
        self.assertEqual(eventFromJSON(lines[1])["log_level"], LogLevel.warn)

    def test_level_filters(self) -> None:
        """Events below the chosen level are not written; those at it and above are."""
        out = io.StringIO()
        log = self.publish(logs.observer(out, "text", "warn"))
        log.debug("debug line")
        log.info("info line")
        log.warn("warn line")
        log.error("error line")
        text = out.getvalue()
        self.assertNotIn("debug line", text)
        self.assertNotIn("info line", text)
        self.assertIn("warn line", text)
        self.assertIn("error line", text)
        self.assertEqual(len(text.splitlines()), 2)


class OptionsTests(unittest.TestCase):
    def test_defaults(self) -> None:
        """Text at info level unless asked otherwise."""
        options = Options()
        options.parseOptions([])
        self.assertEqual((options["log-format"], options["log-level"]), ("text", "info"))

    def test_bad_values_refused(self) -> None:
        """An unknown format or level is refused in one line each, naming the flag."""
        with self.assertRaises(Refused) as caught:
            Options().parseOptions(["--log-format", "xml", "--log-level", "loud"])
        self.assertEqual(len(caught.exception.problems), 2)
        self.assertTrue(caught.exception.problems[0].startswith("--log-format: must be one of text, json"))
        self.assertTrue(caught.exception.problems[1].startswith("--log-level: must be one of debug, info"))

    def test_sets_twistd_logger(self) -> None:
        """Under twistd the options name the observer factory in twistd's --logger, and keep its --logfile."""
        self.addCleanup(logs._chosen.clear)
        twistd = {"logger": None, "logfile": "node.log", "nodaemon": True, "syslog": False}
        self.assertIsNone(logs.choose_twistd_observer(twistd, "json", "warn"))
        self.assertEqual(twistd["logger"], "meshd.logs.twistd_observer")
        self.assertEqual((logs._chosen["format"], logs._chosen["level"], logs._chosen["logfile"]),
                         ("json", "warn", "node.log"))

    def test_explicit_twistd_logger(self) -> None:
        """twistd's own --logger wins with the defaults, and conflicts with a format or level."""
        twistd = {"logger": "some.observer"}
        self.assertIsNone(logs.choose_twistd_observer(twistd, "text", "info"))
        self.assertEqual(twistd["logger"], "some.observer")
        self.assertIn("--logger", logs.choose_twistd_observer(twistd, "json", "info"))

    def test_json_not_to_syslog(self) -> None:
        """JSON lines go to a file or standard output, not to syslog."""
        self.assertIn("--syslog", logs.choose_twistd_observer({"logger": None, "syslog": True}, "json", "info"))


def _run_node(tmp: Path, *args: str) -> list[str]:
    """Run ``twistd -n meshd`` until it has started, stop it, and return its log file's lines."""
    log = tmp / "node.log"
    proc = subprocess.Popen(
        [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(log), "meshd",
         "--listen", "tcp:0:interface=127.0.0.1", "--node-name", "alpha", *args],
        cwd=tmp, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and "in development mode" in log.read_text():  # at warn level, once listening
                break
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.terminate()
        out, _ = proc.communicate(timeout=20)
    if proc.returncode not in (0, -15):  # twistd ends a SIGTERM stop by re-raising it
        raise AssertionError(f"twistd exited {proc.returncode}: {out!r}")
    return log.read_text().splitlines()


@pytest.mark.slow
class ProcessLogTests(unittest.TestCase):
    def tmp(self) -> Path:
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir(parents=True)
        return tmp

    def test_json_log(self) -> None:
        """With --log-format json every line of a node's log file is a JSON object with its id and name."""
        lines = _run_node(self.tmp(), "--log-format", "json")
        events = [json.loads(line) for line in lines]
        texts = [e["log_text"] for e in events]
        self.assertTrue(any("meshd node" in t and "(alpha) starting" in t for t in texts), texts)
        self.assertTrue(any("Main loop terminated" in t for t in texts), texts)
        node_ids = {e["node_id"] for e in events}
        self.assertEqual(len(node_ids), 1)
        self.assertEqual({e["node_name"] for e in events}, {"alpha"})
        self.assertEqual(len(texts), len(set(zip(texts, (e["log_time"] for e in events)))), "no event twice")

    def test_warn_level_drops_info(self) -> None:
        """--log-level warn writes the development-mode warning and none of the info lines."""
        lines = _run_node(self.tmp(), "--log-format", "json", "--log-level", "warn")
        events = [json.loads(line) for line in lines]
        self.assertTrue(events)
        self.assertEqual({e["log_level"]["name"] for e in events}, {"warn"})
        self.assertTrue(any("in development mode" in e["log_text"] for e in events))

    def test_text_stays_the_default(self) -> None:
        """Without the flags the log is twistd's text lines, info included."""
        lines = _run_node(self.tmp())
        self.assertTrue(any("[meshd.app.Application#info] meshd node" in line for line in lines), lines)
        self.assertFalse(any(line.startswith("{") for line in lines))


class LinkFieldsTests(unittest.TestCase):
    def test_link_names_address_and_node(self) -> None:
        """A mesh link's log fields name the peer by the address dialed or connected from and, once it said LinkHello, by node id."""
        from types import SimpleNamespace

        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from meshd.mesh.link import Link
        from meshd.mesh.wire import LinkHello

        mesh = SimpleNamespace(clock=Clock(), settings=SimpleNamespace(max_frame_size=1 << 20))
        accepted = Link(mesh, dialed=False)
        accepted.transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.3", 40000))
        self.assertEqual(accepted.log_fields(), {
            "peer": "10.0.0.3:40000 (node not known yet)", "address": "10.0.0.3:40000", "node": "",
        })
        node = uuid4()
        accepted.remote = LinkHello(node=node, cluster="c", address="10.0.0.3:7946")
        self.assertEqual(accepted.log_fields(), {
            "peer": f"node {node} at 10.0.0.3:40000", "address": "10.0.0.3:40000", "node": str(node),
        })
        dialed = Link(mesh, dialed=True, address="10.0.0.2:7946")
        dialed.remote = LinkHello(node=node, cluster="c", address="elsewhere:1")
        self.assertEqual(dialed.log_fields()["address"], "10.0.0.2:7946", "the address dialed")
