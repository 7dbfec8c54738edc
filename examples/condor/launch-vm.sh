#!/bin/sh
# Wrapper for launch-vanilla.sub: runs the VM staged into this job's sandbox with `vmtool launch`.
# HTCondor starts it in the sandbox; SIGTERM (vacate) reaches vmtool, which shuts the guest down.
set -eu
cd "${_CONDOR_SCRATCH_DIR:-.}"
exec vmtool launch --manifest manifest.json --disk rootfs.qcow2 \
    --console-log console.log --report vm-report.json "$@"
