"""Commands as they may appear in logs and error messages: secrets masked."""

from __future__ import annotations

import re

#: Commands whose arguments carry secrets, and the 0-based argument positions to mask.
#: +CGAUTH=<cid>,<auth_prot>,<userid>,<password> (27.007 §10.1.31); +CPIN=<pin>[,<newpin>]
#: (§8.3); +CLCK=<fac>,<mode>,<passwd> (§7.4); +CPWD=<fac>,<oldpwd>,<newpwd> (§7.5);
#: Quectel +QICSGP=<cid>,<type>,<apn>,<user>,<password>,<auth>.
SECRET_ARGS: dict[str, frozenset[int]] = {
    "+CGAUTH": frozenset({2, 3}),
    "+CPIN": frozenset({0, 1}),
    "+CLCK": frozenset({2}),
    "+CPWD": frozenset({1, 2}),
    "+QICSGP": frozenset({3, 4}),
}

_SET = re.compile(r"^(AT)?(?P<name>[+$!^%][A-Z0-9]+)=(?P<args>.*)$", re.IGNORECASE | re.DOTALL)
_ARG = re.compile(r'"[^"]*"|[^,]*')
MASK = '"***"'


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments, quoted strings kept whole (commas inside them too)."""
    args: list[str] = []
    pos = 0
    while True:
        match = _ARG.match(text, pos)
        end = match.end() if match else pos
        args.append(text[pos:end])
        if end >= len(text) or text[end] != ",":
            # anything after an unterminated quote stays in the last argument
            if end < len(text):
                args[-1] = text[pos:]
            return args
        pos = end + 1


def loggable(command: str) -> str:
    """The command with secret arguments replaced by "***"; other commands unchanged."""
    match = _SET.match(command.strip())
    if match is None:
        return command
    positions = SECRET_ARGS.get(match.group("name").upper())
    if not positions:
        return command
    args = _split_args(match.group("args"))
    masked = [MASK if i in positions and arg != "" else arg for i, arg in enumerate(args)]
    prefix = command.strip()[: match.start("args")]
    return prefix + ",".join(masked)
