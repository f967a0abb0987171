"""Who may use the review page: signed session cookies, CSRF tokens, the loopback rule without a token.

With ``TAGGER_REVIEW_TOKEN`` set, a reviewer signs in once with the token and a name; the session cookie is
signed with a key derived from the token (rotating the token signs everybody out). Without a token the page
answers only to requests from this machine (loopback client, local Host header, not forwarded by a proxy), so
the zero-configuration demo works and nothing is exposed when ``tagger serve --host 0.0.0.0`` is used. Every
POST carries a CSRF token bound to the session (form field ``csrf`` or header ``X-CSRF-Token``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from tagger.review import Forbidden, NotSignedIn
from tagger.settings import env_name

SESSION_COOKIE = "tagger_review"
LOGIN_COOKIE = "tagger_review_login"
SESSION_TTL_S = 12 * 3600
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class Session:
    who: str
    sid: str
    issued_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Access:
    """Signs and checks session cookies and CSRF tokens for one server process."""

    def __init__(self, token: str | None, *, read_only: bool = False, now: Callable[[], float] = time.time) -> None:
        self.token = token or None
        self.read_only = read_only
        self._now = now
        # Without a token, a random key: sessions last as long as the process, which is enough on one machine.
        seed = (b"tagger-review-session\0" + self.token.encode("utf-8")) if self.token else secrets.token_bytes(32)
        self._key = hashlib.sha256(seed).digest()

    def _mac(self, purpose: str, payload: str) -> str:
        return _b64(hmac.new(self._key, f"{purpose}\0{payload}".encode(), hashlib.sha256).digest())

    # ---- sign-in -----------------------------------------------------------------------------------------

    def token_matches(self, supplied: str | None) -> bool:
        if self.token is None:
            return True
        return hmac.compare_digest(self.token.encode("utf-8"), (supplied or "").encode("utf-8"))

    def issue(self, who: str) -> str:
        payload = _b64(json.dumps({"who": who, "sid": secrets.token_hex(16), "iat": int(self._now())}).encode())
        return f"{payload}.{self._mac('session', payload)}"

    def session(self, cookie: str | None) -> Session | None:
        """The session a cookie stands for, or None when it is missing, forged or expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        payload, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac("session", payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            session = Session(str(data["who"]), str(data["sid"]), int(data["iat"]))
        except (ValueError, KeyError, TypeError):
            return None
        if not 0 <= self._now() - session.issued_at <= SESSION_TTL_S:
            return None
        return session

    # ---- CSRF --------------------------------------------------------------------------------------------

    def csrf_token(self, session: Session) -> str:
        return self._mac("csrf", session.sid)

    def check_csrf(self, session: Session, supplied: str | None) -> None:
        if not supplied or not hmac.compare_digest(supplied, self.csrf_token(session)):
            raise Forbidden("the form's security token is missing or stale (CSRF check); reload the page and try again")

    def login_nonce(self) -> str:
        """A double-submit value for the sign-in form (there is no session yet to bind a token to)."""
        return secrets.token_urlsafe(24)

    @staticmethod
    def check_login_nonce(cookie: str | None, supplied: str | None) -> None:
        if not cookie or not supplied or not hmac.compare_digest(cookie, supplied):
            raise Forbidden("the sign-in form expired or was not sent from this page (CSRF check); "
                            "reload the sign-in page and try again")

    # ---- who may reach the page --------------------------------------------------------------------------

    def check_reachable(self, client_host: str | None, host_header: str | None, forwarded: bool) -> None:
        """Without a token only this machine may use the page (DNS rebinding is stopped by the Host check)."""
        if self.token is not None:
            return
        if forwarded or not is_loopback(client_host) or not is_local_host_header(host_header):
            raise Forbidden(f"the review page answers only on this machine while {env_name('review_token')} is "
                            f"unset; set {env_name('review_token')} on the server to let reviewers sign in from "
                            "elsewhere")

    def require_session(self, cookie: str | None) -> Session:
        session = self.session(cookie)
        if session is None:
            raise NotSignedIn("sign in to the review page first")
        return session

    def check_writable(self) -> None:
        if self.read_only:
            raise Forbidden(f"the review page is read-only ({env_name('review_read_only')} is set): decisions are "
                            "not recorded; ask an operator to unset it")


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_local_host_header(value: str | None) -> bool:
    if not value:
        return False
    host = value.strip().lower()
    if host.startswith("["):  # [::1]:8080
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return host in LOCAL_HOSTS or is_loopback(host)
