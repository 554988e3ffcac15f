"""HTTP layer: one blueprint per concern, each thin (parse, call, answer)."""

from __future__ import annotations

from flask import Flask


def register(app: Flask) -> None:
    """Attach every blueprint, the request-size checks and the JSON error handlers to `app`,
    and wrap its WSGI app: hook calls answered ahead of Flask's dispatch (`hook_route`), then
    the per-answer headers on everything (security, CORS: errors and preflight included).
    Every server (the ASGI front, gunicorn, the test client) calls `app.wsgi_app`."""
    from cds_service.http import demo, errors, feedback, hook_route, hooks, ops

    errors.register(app)
    app.register_blueprint(hooks.blueprint)
    app.register_blueprint(feedback.blueprint)
    app.register_blueprint(ops.blueprint)
    if app.extensions["cds"].settings.demo_mode:
        app.register_blueprint(demo.blueprint)
    app.wsgi_app = errors.AnswerHeaders(  # type: ignore[method-assign]
        hook_route.HookRoute(app, app.wsgi_app), app.extensions["cds"].settings.cors_policy.answer_headers)
