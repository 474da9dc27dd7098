"""web/access.py: the access rules a binding gets (a token off loopback, made when none is given, refused when
short). The rules at work on the served dashboard: tests/test_dashboard.py.

    pytest -q tests/test_access.py
"""

from __future__ import annotations

import pytest
from dashboard_run import TOKEN

from evertrain.web import access as auth


def test_rules_for_a_binding():
    assert auth.Access.for_binding("127.0.0.1", None) == auth.Access(None, True)
    assert auth.Access.for_binding("::1", None).loopback
    made = auth.Access.for_binding("0.0.0.0", None)
    assert not made.loopback and len(made.token) >= 24 and made != auth.Access.for_binding("0.0.0.0", None)
    assert auth.Access.for_binding("192.0.2.1", TOKEN) == auth.Access(TOKEN, False)
    for weak in ("", " ", "x" * 15):
        with pytest.raises(auth.TokenRefused, match="at least 16 characters"):
            auth.Access.for_binding("0.0.0.0", weak)
