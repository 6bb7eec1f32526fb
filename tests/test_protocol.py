"""Request models: what the API accepts before any work starts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.protocol import NpcLoad


def test_keep_alive_must_be_a_finite_duration():
    assert NpcLoad(keep_alive="5m").keep_alive == 300 and NpcLoad(keep_alive="pin").keep_alive == -1
    for bad in (float("nan"), float("inf"), "nan", "inf", "-infs"):
        with pytest.raises(ValidationError, match="keep_alive"):
            NpcLoad(keep_alive=bad)
