"""Secrets in AT commands are masked wherever a command is logged or reported."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.at.redact import loggable


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ('AT+CGAUTH=1,1,"user","pa,ss"', 'AT+CGAUTH=1,1,"***","***"'),
        ("AT+CGAUTH=1,0", "AT+CGAUTH=1,0"),
        ('at+cpin="1234"', 'at+cpin="***"'),
        ('AT+CPIN="12345678","4321"', 'AT+CPIN="***","***"'),
        ('AT+CLCK="SC",1,"0000"', 'AT+CLCK="SC",1,"***"'),
        ('AT+CPWD="SC","0000","1111"', 'AT+CPWD="SC","***","***"'),
        ('AT+QICSGP=1,1,"apn","u","p",1', 'AT+QICSGP=1,1,"apn","***","***",1'),
        ("AT+CPIN?", "AT+CPIN?"),
        ('AT+CGDCONT=1,"IP","internet"', 'AT+CGDCONT=1,"IP","internet"'),
        ('AT+CGAUTH=1,1,"user","unterminated', 'AT+CGAUTH=1,1,"***","***"'),
    ],
)
def test_secret_arguments_are_masked(command: str, shown: str) -> None:
    assert loggable(command) == shown


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_a_password_never_survives(password: str) -> None:
    password = password.replace('"', "")
    command = f'AT+CGAUTH=1,1,"someone","{password}"'
    shown = loggable(command)
    assert shown.endswith('"***"')
    assert shown.startswith("AT+CGAUTH=1,1,")
