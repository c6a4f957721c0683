"""API key parsing on hostile strings: authenticate answers None, never raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.errors import AuthenticationError
from veil.server.keys import KeyStore, principal_from_api_key
from veil.server.state import SealedState

FUZZ = settings.get_profile("veil-fuzz")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyStore, str]:
    s = KeyStore(SealedState(tmp_path_factory.mktemp("keys"), bytes(32)))
    _, secret = s.create("user")
    return s, secret


@settings(parent=FUZZ)
@given(value=st.text(max_size=120))
def test_arbitrary_strings(store: tuple[KeyStore, str], value: str) -> None:
    s, secret = store
    if value.strip() != secret:
        assert s.authenticate(value) is None
        with pytest.raises(AuthenticationError):
            principal_from_api_key(value, s)


@settings(parent=FUZZ)
@given(at=st.integers(0, 85), char=st.characters())
def test_one_character_changed(store: tuple[KeyStore, str], at: int, char: str) -> None:
    s, secret = store
    changed = secret[:at] + char + secret[at + 1 :]
    if changed != secret:
        assert s.authenticate(changed) is None
