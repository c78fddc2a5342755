#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite (slow and GPU tests excluded; see README).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec .venv/bin/python -m pytest "$@"
