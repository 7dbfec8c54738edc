#!/usr/bin/env bash
# Cloud tier set-up: a separate venv holding a real OpenStack Glance API from PyPI, which the test
# fixture (tests/fixtures/cloud.py) runs on a loopback port with sqlite and a file store.
# Glance pulls ~120 packages (oslo.*, eventlet, taskflow...) that must not leak into vmtool's own venv.
# Idempotent: a stamp file records the pinned version; a second run only checks it (well under a second).
set -euo pipefail

GLANCE_VERSION="${VMTOOL_GLANCE_VERSION:-33.0.0}"
GLANCE_VENV="${VMTOOL_GLANCE_VENV:-/opt/vmtool-glance}"
stamp="$GLANCE_VENV/.vmtool-glance-$GLANCE_VERSION"

if [ -f "$stamp" ] && [ -x "$GLANCE_VENV/bin/python" ]; then
    exit 0
fi
parent="$(dirname "$GLANCE_VENV")"
if ! mkdir -p "$parent" 2>/dev/null || [ ! -w "$parent" ]; then
    echo "deps.d/50-cloud: cannot write $parent: the cloud tests need a Glance venv there" >&2
    echo "hint: run 'make deps' as root, or set VMTOOL_GLANCE_VENV to a writable path" >&2
    exit 0
fi
echo "deps.d/50-cloud: installing glance $GLANCE_VERSION into $GLANCE_VENV (about a minute, once)"
rm -rf "$GLANCE_VENV"
/usr/bin/python3 -m venv "$GLANCE_VENV"
"$GLANCE_VENV/bin/pip" install -q --upgrade pip >/dev/null
"$GLANCE_VENV/bin/pip" install -q "glance==$GLANCE_VERSION"
# The fixture imports glance.wsgi.api under a stdlib wsgiref server; check it loads before stamping.
"$GLANCE_VENV/bin/python" -c 'import glance.common.wsgi_app, glance_store' >/dev/null
touch "$stamp"
