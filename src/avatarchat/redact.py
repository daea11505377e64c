"""Credentials out of what people see: a configured URL (``redis://:PASSWORD@…``, ``https://user:pass@…``,
``…?password=…``) is shown with ``***`` in its place in every HTTP response, client-facing error and log line.
"""

from __future__ import annotations

import re

# scheme://userinfo@ up to the netloc's last "@" (as URL parsers split it: a raw "@" in a password stays
# hidden); it cannot cross a "/", "?" or "#", so an e-mail address in a path or query is not taken for one.
_USERINFO = re.compile(r"""(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^\s/?#"'<>]+)@""")
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&](?:password|passwd|pass|pwd|token|access_token|api_key|apikey|key|secret)=)[^&#\s'\"]*",
    re.IGNORECASE,
)


def _userinfo(m: re.Match[str]) -> str:
    user, sep, _password = m["userinfo"].partition(":")
    # user:password keeps the user name; a lone user name may itself be a token (https://TOKEN@host).
    return f"{m['scheme']}{user}:***@" if sep else f"{m['scheme']}***@"


def redact_url(text: str) -> str:
    """``text`` (a URL, or a message holding URLs) with every credential in a URL replaced by ``***``."""
    if "://" not in text and "=" not in text:  # the common case, without a regex pass
        return text
    return _SECRET_PARAM.sub(r"\g<name>***", _USERINFO.sub(_userinfo, text))
