"""HTTP layer: one blueprint per concern, each thin (parse, call, answer)."""

from __future__ import annotations

from flask import Flask


def register(app: Flask) -> None:
    """Attach every blueprint, the CORS headers and the JSON error handlers to `app`."""
    from cds_service.http import demo, errors, feedback, hooks, ops

    errors.register(app)
    app.register_blueprint(hooks.blueprint)
    app.register_blueprint(feedback.blueprint)
    app.register_blueprint(ops.blueprint)
    if app.extensions["cds"].settings.demo_mode:
        app.register_blueprint(demo.blueprint)
