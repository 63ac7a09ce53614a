"""Local accounts for the web API: hashed passwords, two roles, refused requests counted.

Accounts live in ``<home>/users.json`` (mode 0600), written by ``qcnode user add``;
passwords are stored as scrypt hashes (stdlib ``hashlib.scrypt``, N=2^14, r=8, p=1, 16-byte
salt), compared in constant time. Roles: ``read-only`` (GET) and ``admin`` (every
method). The API takes HTTP Basic credentials on every request (no server-side session
to expire); a browser's unsafe request (POST, PUT, DELETE) from another origin is
refused (CSRF: ``Origin`` / ``Sec-Fetch-Site`` must say same-origin when present).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Role = Literal["read-only", "admin"]
ROLES: tuple[Role, ...] = ("read-only", "admin")
USERS_FILE = "users.json"
_N, _R, _P = 1 << 14, 8, 1


@dataclass(frozen=True)
class User:
    """An authenticated caller."""

    name: str
    role: Role


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` (hex) of ``password``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a :func:`hash_password` value (constant time)."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(bytes.fromhex(digest)))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, bytes.fromhex(digest))


class Accounts:
    """The users file of a node home."""

    def __init__(self, home: Path) -> None:
        self.path = home / USERS_FILE

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return dict(data)

    def add(self, name: str, password: str, role: Role) -> None:
        """Create or replace ``name`` with ``password`` and ``role``."""
        if role not in ROLES or not name or ":" in name:
            raise ValueError(f"a user needs a name without ':' and a role of {ROLES}")
        if len(password) < 12:
            raise ValueError("a password needs at least 12 characters")
        users = self._load()
        users[name] = {"hash": hash_password(password), "role": role}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(users, fh, indent=1)
        os.replace(tmp, self.path)

    def remove(self, name: str) -> bool:
        """Delete ``name``; False when there was none."""
        users = self._load()
        if users.pop(name, None) is None:
            return False
        self.path.write_text(json.dumps(users, indent=1), encoding="utf-8")
        return True

    def any(self) -> bool:
        """Whether any account exists."""
        return bool(self._load())

    def any_admin(self) -> bool:
        """Whether an admin account exists."""
        return any(entry.get("role") == "admin" for entry in self._load().values())

    def check(self, header: str | None) -> User | None:
        """The user an ``Authorization: Basic …`` header proves, or None."""
        if not header or not header.startswith("Basic "):
            return None
        try:
            name, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        entry = self._load().get(name)
        if entry is None:
            verify_password(password, hash_password("timing"))  # same cost as a real check
            return None
        if not verify_password(password, entry.get("hash", "")):
            return None
        role = entry.get("role")
        return User(name, role) if role in ROLES else None


def cross_site(headers: dict[str, str], host: str | None) -> bool:
    """Whether a browser says the request came from another site (CSRF)."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return True
    origin = headers.get("origin")
    if origin is None or origin == "null" or host is None:
        return origin == "null"
    return origin.split("://", 1)[-1] != host


SESSION_COOKIE = "qcnode_session"
SECRET_FILE = "web_secret"  # noqa: S105 - the file's name, not a secret


class Sessions:
    """Console sign-in sessions: a signed cookie that expires.

    The cookie holds ``name|role|expiry|nonce`` and an HMAC-SHA256 of it under a secret
    kept in ``<home>/web_secret`` (0600, made at first use): nothing is stored server
    side, a restart keeps sessions, a new secret ends them all. A session lasts
    ``[web] session_minutes`` from sign-in. Each session's CSRF token is an HMAC of its
    nonce, required in every form the console posts.
    """

    def __init__(self, home: Path, minutes: float) -> None:
        self.path = home / SECRET_FILE
        self.seconds = minutes * 60.0

    def _secret(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
            return self.path.read_bytes()

    def _sign(self, payload: str) -> str:
        return hmac.new(self._secret(), payload.encode(), hashlib.sha256).hexdigest()

    def issue(self, user: User, now: float) -> str:
        """A cookie value for ``user`` that expires ``session_minutes`` from ``now``."""
        payload = f"{user.name}|{user.role}|{int(now + self.seconds)}|{secrets.token_hex(8)}"
        return f"{payload}|{self._sign(payload)}"

    def check(self, cookie: str | None, now: float) -> tuple[User, str] | None:
        """``(user, csrf token)`` of a valid, unexpired cookie, or None."""
        if not cookie or cookie.count("|") != 4:
            return None
        payload, _, signature = cookie.rpartition("|")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        name, role, expiry, nonce = payload.split("|")
        if not expiry.isdigit() or int(expiry) < now or role not in ROLES:
            return None
        return User(name, role), self._sign(f"csrf|{nonce}")
