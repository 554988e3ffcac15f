#!/usr/bin/env bash
# Set up (virtualenv + package) and run the service in demo mode with the built-in synthetic
# patients: open http://127.0.0.1:8080/ . No outside server needed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/b12-cds serve --demo --bind "${CDS_BIND:-127.0.0.1:8080}" "$@"
