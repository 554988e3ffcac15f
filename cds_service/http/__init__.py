"""HTTP layer: one blueprint per concern, each thin (parse, call, answer)."""

from __future__ import annotations

from flask import Flask


def register(app: Flask) -> None:
    """Attach every blueprint, the request-size checks and the JSON error handlers to `app`,
    and wrap its WSGI app in the per-answer headers (security, CORS: on every answer, errors and
    preflight included)."""
    from cds_service.http import demo, errors, feedback, hooks, ops

    errors.register(app)
    app.register_blueprint(hooks.blueprint)
    app.register_blueprint(feedback.blueprint)
    app.register_blueprint(ops.blueprint)
    if app.extensions["cds"].settings.demo_mode:
        app.register_blueprint(demo.blueprint)
    app.wsgi_app = errors.AnswerHeaders(  # type: ignore[method-assign]
        app.wsgi_app, app.extensions["cds"].settings.cors_policy.answer_headers)
