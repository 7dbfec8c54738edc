"""vmtool: run whole KVM virtual machines as ordinary batch jobs."""

__version__ = "0.1.0"
