# -*- test-case-name: tests.test_config -*-
"""``twistd meshd``: command-line options and the service they build."""

from __future__ import annotations

from uuid import UUID

from twisted.python import usage

from meshd.app import Application
from dataclasses import replace

from meshd.config import Config, ConfigError, check_endpoint, is_loopback, load, split_address


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT ...] [options]"
    longdesc = (
        "Run a meshd node. Without --config the node runs in development mode: "
        "WebSocket on 127.0.0.1:8765, loopback only, every operation allowed. "
        "Flags override the configuration file."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (see docs/configuration.md)."],
        ["node-id", None, None, "This node's UUID (default: [node] id, or a new one)."],
        ["node-name", None, None, "A name for this node in logs."],
        ["max-message-size", None, None, "Largest WebSocket message accepted, in bytes.", int],
        ["metrics", None, None, "Serve Prometheus metrics at /metrics on this endpoint."],
        ["mesh-listen", None, None, "Mesh listener endpoint (overrides [mesh] listen)."],
        ["advertise", None, None, "HOST:PORT other nodes dial (overrides [mesh] advertise)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["modules"] = []
        self["seeds"] = []

    def opt_listen(self, endpoint: str) -> None:
        """WebSocket server endpoint, e.g. tcp:8765:interface=127.0.0.1 (repeatable)."""
        try:
            check_endpoint(endpoint)
        except ValueError as e:
            raise usage.UsageError(f"--listen: {e}") from None
        self["listen"].append(endpoint)

    def opt_seed(self, address: str) -> None:
        """HOST:PORT of a node to link with (repeatable; replaces [mesh] seeds)."""
        try:
            split_address(address)
        except ValueError as e:
            raise usage.UsageError(f"--seed: {e}") from None
        self["seeds"].append(address)

    def opt_module(self, name: str) -> None:
        """Python module with a setup(app) function to load (repeatable)."""
        self["modules"].append(name)

    def postOptions(self) -> None:
        try:
            config = load(self["config"]) if self["config"] else Config()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        node_id = None
        if self["node-id"] is not None:
            try:
                node_id = UUID(self["node-id"])
            except ValueError:
                raise usage.UsageError(f"--node-id: not a UUID: {self['node-id']!r}") from None
        if self["max-message-size"] is not None and self["max-message-size"] < 256:
            raise usage.UsageError("--max-message-size: must be at least 256")
        config = config.override(
            node_id=node_id,
            node_name=self["node-name"],
            listen=tuple(self["listen"]) or None,
            max_message_size=self["max-message-size"],
            modules=config.modules + tuple(self["modules"]),
            metrics_listen=self["metrics"],
        )
        if self["metrics"] is not None:
            try:
                check_endpoint(self["metrics"])
            except ValueError as e:
                raise usage.UsageError(f"--metrics: {e}") from None
        mesh_flags = dict(
            listen=self["mesh-listen"], advertise=self["advertise"], seeds=tuple(self["seeds"]) or None
        )
        if any(v is not None for v in mesh_flags.values()):
            if config.mesh is None:
                raise usage.UsageError(
                    "--mesh-listen, --advertise and --seed need a [mesh] section in the configuration file"
                )
            config = replace(config, mesh=replace(config.mesh, **{k: v for k, v in mesh_flags.items() if v is not None}))
        if config.mesh is not None:
            from meshd.mesh.tls import Credentials, CredentialsError

            try:
                check_endpoint(config.mesh.listen)
                Credentials.load(config.mesh.ca, config.mesh.cert, config.mesh.key)
            except (ValueError, CredentialsError) as e:
                raise usage.UsageError(f"{config.source}: mesh: {e}") from None
        if config.development:
            endpoints = config.listen + ((config.metrics_listen,) if config.metrics_listen else ())
            public = [e for e in endpoints if not is_loopback(e)]
            if public:
                raise usage.UsageError(
                    f"development mode (no --config) listens on loopback only; "
                    f"{', '.join(public)} is not loopback. Give a configuration file "
                    f"with [[rules]] to serve other hosts."
                )
        self["config_object"] = config


def makeService(options: Options) -> Application:
    config: Config = options["config_object"]
    app = Application(config)
    for module in config.modules:
        app.load_extension(module)
    for endpoint in config.listen:
        app.listen(endpoint)
    if config.metrics_listen:
        app.serve_metrics(config.metrics_listen)
    return app
