# -*- test-case-name: tests.test_worker_processes -*-
"""The metrics of a host's workers, served together by their supervisor (``[metrics] listen``).

Each worker serves ``/metrics``, ``/healthz`` and ``/readyz`` on a Unix
socket of the workers' directory (:func:`meshd.workers.metrics_path`).  On
``metrics.listen`` the supervisor answers:

- ``GET /metrics``: every worker's families merged, each sample labelled
  with its ``worker`` index (the node's own samples carry its ``node`` id
  as well), and ``meshd_host_workers`` and ``meshd_host_worker_starts_total``
  of the supervisor's own.  A worker that does not answer within
  :data:`ASK_TIMEOUT` seconds is left out, and counted in
  ``meshd_host_workers_unanswered``;
- ``GET /healthz``: 200 while the supervisor runs, with each worker's state, pid and starts;
- ``GET /readyz``: 200 when every worker is ready (its own ``/readyz``),
  else 503 with what each one that is not says.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from meshd.metrics import TEXT_FORMAT, QuietSite, json_answer

if TYPE_CHECKING:
    from meshd.workers import Supervisor

#: Seconds the supervisor waits for a worker's answer.
ASK_TIMEOUT = 2.0


@implementer(IAgentEndpointFactory)
class _Socket:
    """Every request of an Agent goes to one Unix socket."""

    def __init__(self, reactor: Any, path: str) -> None:
        self.reactor = reactor
        self.path = path

    def endpointForURI(self, uri) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self.reactor, self.path, timeout=ASK_TIMEOUT)


def ask(reactor: Any, path: str, resource: bytes, pool: Optional[HTTPConnectionPool] = None
        ) -> "Deferred[tuple[int, bytes]]":
    """GET ``resource`` of the worker serving on ``path``: its status code and body; fails after ASK_TIMEOUT.

    With a ``pool``, connections are kept for the next request (keyed by ``path``).
    """
    agent = Agent.usingEndpointFactory(reactor, _Socket(reactor, path), pool=pool)
    d = agent.request(b"GET", b"http://" + path.encode("utf-8").replace(b"/", b"-") + resource)
    d.addCallback(lambda response: readBody(response).addCallback(lambda body: (response.code, body)))
    return d.addTimeout(ASK_TIMEOUT, reactor)


def merge(texts: "dict[str, str]") -> list[Metric]:
    """The families of several workers' expositions (by worker index), each sample labelled ``worker``."""
    families: dict[str, Metric] = {}
    for worker, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, "worker": worker}))
    return list(families.values())


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return self.families


class HostResource(Resource):
    """``/metrics``, ``/healthz`` and ``/readyz`` of a host (see the module)."""

    isLeaf = True

    def __init__(self, supervisor: "Supervisor") -> None:
        super().__init__()
        self.supervisor = supervisor
        #: One connection kept to each worker, from one scrape to the next.
        self.pool = HTTPConnectionPool(supervisor.reactor, persistent=True)

    def render_GET(self, request) -> Any:
        path = request.path
        if path == b"/healthz":
            workers = {str(w.index): {"state": w.state, "pid": w.pid, "starts": w.starts}
                       for w in self.supervisor.workers}
            return json_answer(request, 200, {"status": "ok", "workers": workers})
        if path not in (b"/metrics", b"/readyz"):
            request.setResponseCode(404)
            return b"not found: try /metrics, /healthz or /readyz\n"
        gone: list = []
        request.notifyFinish().addBoth(gone.append)  # the scraper may hang up while the workers answer
        answers = self._ask_all(path)
        answers.addCallback(lambda found: None if gone else (
            self._metrics if path == b"/metrics" else self._readiness)(found, request))
        answers.addCallback(lambda _: None if gone else request.finish())
        return NOT_DONE_YET

    def _ask_all(self, resource: bytes) -> "Deferred[dict[str, Any]]":
        from meshd.workers import metrics_path

        supervisor = self.supervisor
        indexes = [w.index for w in supervisor.workers]

        def one(index: int) -> Deferred:
            d = ask(supervisor.reactor, str(metrics_path(supervisor.directory, index)), resource, self.pool)
            return d.addErrback(lambda failure: failure.value)  # a worker that does not answer: why

        return gatherResults([one(i) for i in indexes]).addCallback(
            lambda results: dict(zip((str(i) for i in indexes), results)))

    def _metrics(self, answers: "dict[str, Any]", request) -> None:
        texts = {w: a[1].decode("utf-8") for w, a in answers.items() if isinstance(a, tuple) and a[0] == 200}
        families = merge(texts)
        families.extend(self._own(len(answers) - len(texts)))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(families))
        request.setHeader(b"content-type", TEXT_FORMAT)
        request.write(generate_latest(registry))

    def _own(self, unanswered: int) -> list[Metric]:
        workers = GaugeMetricFamily("meshd_host_workers", "The host's workers, by state.", labels=["state"])
        states: dict[str, int] = {}
        for w in self.supervisor.workers:
            states[w.state] = states.get(w.state, 0) + 1
        for state, count in sorted(states.items()):
            workers.add_metric([state], count)
        starts = CounterMetricFamily("meshd_host_worker_starts", "Times each worker process was started.",
                                     labels=["worker"])
        for w in self.supervisor.workers:
            starts.add_metric([str(w.index)], w.starts)
        missing = GaugeMetricFamily("meshd_host_workers_unanswered",
                                    "Workers whose metrics this scrape lacks (they did not answer).", value=unanswered)
        return [workers, starts, missing]

    def _readiness(self, answers: "dict[str, Any]", request) -> None:
        not_ready = {}
        for worker, answer in answers.items():
            if not isinstance(answer, tuple):
                not_ready[worker] = {"status": "not answering", "error": str(answer) or type(answer).__name__}
            elif answer[0] != 200:
                try:
                    not_ready[worker] = json.loads(answer[1])
                except ValueError:
                    not_ready[worker] = {"status": f"HTTP {answer[0]}"}
        stopping = not self.supervisor.running
        if not_ready or stopping:
            body: dict = {"status": "not ready", "workers": not_ready}
            if stopping:
                body["draining"] = "the host is draining"
            request.write(json_answer(request, 503, body))
        else:
            request.write(json_answer(request, 200, {"status": "ready", "workers": len(answers)}))


def serve_host_metrics(supervisor: "Supervisor", endpoint: str) -> None:
    """Serve the host's metrics on ``endpoint`` while ``supervisor`` runs."""
    from meshd.listening import Listening

    resource = HostResource(supervisor)
    supervisor.on_stop(resource.pool.closeCachedConnections)
    service = Listening(endpoint, QuietSite(resource))
    service.setName(f"metrics:{endpoint}")
    service.setServiceParent(supervisor)
