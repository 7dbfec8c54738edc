#!/bin/sh
# Wrapper for launch-vanilla.sub: runs the VM staged into this job's sandbox with `vmtool launch`.
# HTCondor starts it in the sandbox; SIGTERM (vacate, condor_rm) reaches vmtool, which shuts the guest
# down. The disk is the overlay the vmimage plugin wrote: HTCondor names it after the URL's basename
# (vmimage:///nfs/images/debian-12/rootfs.img -> rootfs.img; it holds qcow2 whatever its name).
set -eu
cd "${_CONDOR_SCRATCH_DIR:-.}"
# transfer_output_files lists console.log: make sure it exists even when the VM never starts, or
# HTCondor holds the job for a missing output file and the user gets back neither it nor the report.
: >> console.log
exec vmtool launch --manifest manifest.json --disk rootfs.img \
    --console-log console.log --report vm-report.json "$@"
