from __future__ import annotations

import pytest

from tests.fixtures.condor import Pool

pytestmark = [pytest.mark.condor]


def test_startd_advertises_vmimage(condor_pool: Pool) -> None:
    ad = condor_pool.startd_ad()
    assert "vmimage" in ad["HasFileTransferPluginMethods"].split(","), ad
