"""The network-namespace suite (tests/netns/): skipped only where the system forbids namespaces.

The probe (tests/support/netns.py `unavailable_reason`) creates a namespace, a veth and an
iptables statistic rule and removes them; a refusal (not root, kernel says no) skips every test
here with that reason. Missing tools are an error, not a skip: scripts/setup.sh installs them.
It must never skip for any other reason.
"""

from __future__ import annotations

import pytest

from tests.support.netns import unavailable_reason


@pytest.fixture(scope="session", autouse=True)
def netns_allowed() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
