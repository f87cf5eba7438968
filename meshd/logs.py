# -*- test-case-name: tests.test_checks tests.test_logs -*-
"""Every log event of a node process carries the node's id and name.

``twistd meshd`` runs one node per process, so :func:`meshd.tap.makeService`
installs :class:`NodeFields` on the global log publisher: each event then has
``node_id`` and ``node_name`` fields, which structured observers (such as
``twisted.logger.jsonFileLogObserver``) write out with it.  Nodes run
in-process (tests, embedding) do not install it.

``--log-format`` and ``--log-level`` choose the observer twistd writes with
(:func:`choose_twistd_observer`): Twisted's text lines or one JSON object a
line, and the lowest level written.
"""

from __future__ import annotations

import signal
import sys
from typing import IO, Any, Optional
from uuid import UUID

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    eventAsJSON,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from zope.interface import implementer


@implementer(ILogObserver)
class NodeFields:
    """Adds ``node_id`` and ``node_name`` to each event, unless it has them already.

    The publisher hands the same event to each of its observers in turn, so
    this must come before the observers that write events out: twistd adds
    its own when it starts logging, after :meth:`install` has run.
    """

    def __init__(self, node_id: UUID, node_name: str = "") -> None:
        self.node_id = str(node_id)
        self.node_name = node_name

    def __call__(self, event: dict[str, Any]) -> None:
        event.setdefault("node_id", self.node_id)
        event.setdefault("node_name", self.node_name)

    def install(self, publisher: Optional[LogPublisher] = None) -> "NodeFields":
        """Stamp every event ``publisher`` (the global one by default) publishes from now on."""
        # Observers are called in the order they were added; before twistd
        # starts logging, the only one is the buffer that keeps early events
        # (the same dicts, so they get the fields too) until it hands them on.
        (globalLogPublisher if publisher is None else publisher).addObserver(self)
        return self

    def uninstall(self, publisher: Optional[LogPublisher] = None) -> None:
        (globalLogPublisher if publisher is None else publisher).removeObserver(self)


# -- the observer twistd writes with ------------------------------------------------

#: ``--log-format`` values.
FORMATS = ("text", "json")
#: ``--log-level`` values, lowest first.
LEVELS = ("debug", "info", "warn", "error", "critical")

#: What :func:`choose_twistd_observer` chose, for :func:`twistd_observer`.
_chosen: dict[str, Any] = {}


def choose_twistd_observer(twistd_options: Any, log_format: str, log_level: str) -> Optional[str]:
    """Make twistd log through :func:`twistd_observer`, with this format and level.

    twistd takes its observer from its ``--logger`` option, the fully
    qualified name of a callable returning one; it is read when twistd
    starts logging, after the options are parsed and the service made.
    This sets that option (before twistd resolves the name) and keeps what
    twistd's own observer would write to (``--logfile``, ``-n``,
    ``--syslog``), so the node's events go out once each, through one
    observer.  Returns why not, when ``--logger`` was given too (while a
    format or level other than the default was) or JSON is asked of syslog.
    """
    default = log_format == "text" and log_level == "info"
    if twistd_options.get("logger"):
        return None if default else "--log-format and --log-level cannot be combined with twistd's --logger"
    if log_format == "json" and twistd_options.get("syslog"):
        return "--log-format json writes to --logfile or standard output, not to --syslog"
    _chosen.clear()
    _chosen.update(
        format=log_format,
        level=log_level,
        logfile=twistd_options.get("logfile") or "",
        nodaemon=bool(twistd_options.get("nodaemon")),
        syslog=bool(twistd_options.get("syslog")),
        prefix=twistd_options.get("prefix") or "twisted",
    )
    twistd_options["logger"] = f"{__name__}.twistd_observer"
    return None


def twistd_observer() -> ILogObserver:
    """The observer twistd logs to (its ``--logger``), as :func:`choose_twistd_observer` chose it."""
    chosen = dict(_chosen) or dict(format="text", level="info", logfile="", nodaemon=False, syslog=False)
    if chosen.get("syslog"):
        from twisted.logger import LegacyLogObserverWrapper
        from twisted.python.syslog import SyslogObserver

        return filtered(LegacyLogObserverWrapper(SyslogObserver(chosen["prefix"]).emit), chosen["level"])
    return observer(_log_file(chosen["logfile"], chosen["nodaemon"]), chosen["format"], chosen["level"])


def observer(out: IO[str], log_format: str = "text", log_level: str = "info") -> ILogObserver:
    """An observer writing each event of ``log_level`` or above to ``out`` as one line.

    ``text``: twistd's own lines (``textFileLogObserver``).  ``json``: one
    JSON object a line, Twisted's ``eventAsJSON`` (``eventFromJSON`` reads
    it back), with UUID fields as strings and ``log_text``, the formatted
    message (and the traceback of a failure), added.
    """
    if log_format == "json":
        written: ILogObserver = FileLogObserver(out, _json_line)
    else:
        written = textFileLogObserver(out)
    return filtered(written, log_level)


def filtered(observer: ILogObserver, log_level: str) -> ILogObserver:
    """``observer``, seeing only the events of ``log_level`` or above."""
    return FilteringLogObserver(
        observer, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(log_level))]
    )


def _json_line(event: dict[str, Any]) -> str:
    event = {key: str(value) if isinstance(value, UUID) else value for key, value in event.items()}
    event["log_text"] = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        event["log_text"] += "\n" + failure.getTraceback()
    return eventAsJSON(event) + "\n"


def _log_file(logfile: str, nodaemon: bool) -> IO[str]:
    """Where twistd's own observer would write: standard output or a rotated ``LogFile``."""
    if logfile == "-":
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return sys.stdout
    if nodaemon and not logfile:
        return sys.stdout
    from twisted.python.logfile import LogFile

    out = LogFile.fromFullPath(logfile or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):
        # As twistd does for its log file: SIGUSR1 rotates it.
        def rotate(signum, frame) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return out
