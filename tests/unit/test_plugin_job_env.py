"""The plugin's view of a job's S3 settings: only VMTOOL_* of the job reach it (docs/condor.md)."""

from __future__ import annotations

import pytest

from vmtool.condor.plugin import job_aws_environment

pytestmark = [pytest.mark.unit]


def test_vmtool_aws_variables_become_aws_ones() -> None:
    env = {"VMTOOL_AWS_ACCESS_KEY_ID": "AKIAJOB", "VMTOOL_AWS_SECRET_ACCESS_KEY": "s3cr3t",
           "VMTOOL_AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "node-region",
           "VMTOOL_AWS_REGION": "job-region", "VMTOOL_AWS_": "x", "VMTOOL_CACHE": "/c"}
    job_aws_environment(env)
    assert env["AWS_ACCESS_KEY_ID"] == "AKIAJOB" and env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert env["AWS_REGION"] == "job-region"  # what the job asked for
    assert "AWS_" not in env and "CACHE" not in env
