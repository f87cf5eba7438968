"""An extension module for the configuration tests."""


def setup(app) -> None:
    app.handlers.register(1024, lambda request: b"loaded")
