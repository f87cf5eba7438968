# -*- test-case-name: tests.test_config -*-
"""Registers ``twistd meshd``; the wiring lives in :mod:`meshd.tap`."""

from twisted.application.service import ServiceMaker

meshd = ServiceMaker(
    "meshd",
    "meshd.tap",
    "A clustered real-time event server (WebSocket pub/sub and events).",
    "meshd",
)
