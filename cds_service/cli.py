"""`b12-cds` command line: serve | evaluate | seed | feedback-report | audit | test-token | healthcheck.

Each subcommand lives in `cds_service/commands/<name>.py` with `add_arguments(parser)` and
`run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "serve": ("serve", "run the service (gunicorn in production, Flask's server with --dev)"),
    "evaluate": ("evaluate", "run a hook against a FHIR server and print the cards"),
    "seed": ("seed", "load the synthetic demo patients into a FHIR server"),
    "feedback-report": ("feedback_report", "acceptance report of the cards issued"),
    "audit": ("audit", "population dry run: every patient of a FHIR Bulk Data export through the engine"),
    "test-token": ("test_token", "a signed test JWT from a local key, for trying the service outside demo mode"),
    "healthcheck": ("healthcheck", "exit 0 when the local service's /healthz answers (the Docker HEALTHCHECK)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="b12-cds", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(f"cds_service.commands.{module}")
        mod.add_arguments(cmd)
        cmd.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand.  A user error (`CliError`: unreachable server, bad file, ...) is one
    line on stderr and exit status 1, never a traceback; so are Ctrl-C (130) and a reader that
    went away (`b12-cds ... | head`)."""
    from cds_service.commands.fhir_client import CliError

    args = build_parser().parse_args(argv)
    try:
        status = int(args._run(args) or 0)
        sys.stdout.flush()
        return status
    except CliError as err:
        print(f"b12-cds {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"b12-cds {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader closed the pipe (e.g. `| head`): stop quietly.  Point stdout at /dev/null so
        # the interpreter's final flush does not raise again (Python docs, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
