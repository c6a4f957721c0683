"""The portal's pages: sign-up, login, API keys (Settings), the user's models, a public catalogue.

Server-rendered with Jinja2 (autoescaping on: every value is text, a model named ``<script>``
included). Each browser holds one session cookie (``__Host-`` prefixed: Secure, path ``/``,
no domain; HttpOnly; SameSite=Strict); every form carries that session's CSRF token, checked on
every POST. Logging in and signing up replace the session (a token planted before login opens
nothing after it). Failed logins are limited per e-mail and per client address.

The portal is an ordinary veil client with an admin key (`VeilAdmin`): it asks the server to
create, list and revoke keys, and keeps only which key ids belong to which account.
"""

from __future__ import annotations

import hmac
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any, Protocol

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from veil.client.responses import ApiKeyInfo, ModelInfo
from veil.errors import VeilError
from veil.portal.store import SESSION_LIFETIME_S, Account, PortalStore, Session

__all__ = ["COOKIE", "LoginLimiter", "VeilAdmin", "build_portal"]

COOKIE = "__Host-veil-session"
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,189}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_MIN_PASSWORD, _MAX_PASSWORD = 12, 1024
_MAX_FORM_BYTES = 16 << 10
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class VeilAdmin(Protocol):
    """What the portal asks of the veil server: a `veil.Connection` with an admin key."""

    def create_key(self, role: str, name: str | None = None) -> tuple[ApiKeyInfo, str]: ...
    def list_keys(self) -> list[ApiKeyInfo]: ...
    def revoke_key(self, key_id: str) -> None: ...
    def list_models(self) -> list[ModelInfo]: ...
    def delete_model(self, model_id: str) -> None: ...


class LoginLimiter:
    """Failed logins allowed per e-mail and per client address within a sliding window."""

    def __init__(
        self,
        *,
        per_email: int = 5,
        per_address: int = 20,
        window_s: float = 900.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = {"email": per_email, "address": per_address}
        self._window = window_s
        self._now = now
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str]) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= self._now() - self._window:
            times.popleft()
        return times

    def blocked(self, email: str, address: str) -> bool:
        with self._lock:
            return any(
                len(self._recent((kind, value))) >= self._limits[kind]
                for kind, value in (("email", email), ("address", address))
            )

    def failed(self, email: str, address: str) -> None:
        with self._lock:
            for key in (("email", email), ("address", address)):
                self._recent(key).append(self._now())
            # Bounded: forget whoever has no failure left in the window.
            for key in [k for k, v in self._failures.items() if not v]:
                del self._failures[key]


def _time(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("veil.portal", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["time"] = _time
    env.filters["hex"] = lambda value: value.hex() if isinstance(value, bytes) else str(value)
    return env


def _static(name: str) -> bytes:
    return resources.files("veil.portal").joinpath("static", name).read_bytes()


def build_portal(
    store: PortalStore,
    admin: VeilAdmin,
    *,
    service_name: str = "veil",
    login_limiter: LoginLimiter | None = None,
) -> Starlette:
    """The portal's ASGI app.

    Args:
        store: accounts, sessions and key ownership.
        admin: the veil server, through a connection holding an admin key.
        service_name: shown in page titles.
        login_limiter: failed-login limits (default: 5 per e-mail, 20 per address, 15 min).
    """
    env = _environment()
    limiter = login_limiter or LoginLimiter()
    admin_lock = threading.Lock()  # one request at a time on the one admin connection
    assets = {
        "portal.css": (_static("portal.css"), "text/css"),
        "portal.js": (_static("portal.js"), "text/javascript"),
    }

    async def call(method: Callable[..., Any], *args: Any) -> Any:
        def locked() -> Any:
            with admin_lock:
                return method(*args)

        return await run_in_threadpool(locked)

    def page(session: Session, template: str, status: int = 200, **values: Any) -> Response:
        html = env.get_template(template).render(
            service=service_name, account=session.account, csrf=session.csrf, **values
        )
        response = Response(html, status_code=status, media_type="text/html")
        response.headers.update(_HEADERS)
        set_cookie(response, session)
        return response

    def set_cookie(response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            session.token,
            max_age=SESSION_LIFETIME_S,
            path="/",
            secure=True,
            httponly=True,
            samesite="strict",
        )

    def redirect(session: Session, to: str) -> Response:
        response = RedirectResponse(to, status_code=303)
        response.headers.update(_HEADERS)
        set_cookie(response, session)
        return response

    def current(request: Request) -> Session:
        token = request.cookies.get(COOKIE, "")
        found = store.session(token) if token else None
        return found or store.new_session()

    async def form(request: Request, session: Session) -> dict[str, str]:
        """The form's fields, after its CSRF token matched the session's (403 otherwise)."""
        if int(request.headers.get("content-length") or 0) > _MAX_FORM_BYTES:
            raise _Refused(413, "form too large")
        data = await request.form(max_files=0, max_fields=20)
        fields = {k: v for k, v in data.items() if isinstance(v, str)}
        if not hmac.compare_digest(fields.get("csrf", ""), session.csrf):
            raise _Refused(403, "the form expired or came from another site: reload and retry")
        return fields

    def address(request: Request) -> str:
        return request.client.host if request.client is not None else "-"

    def logged_in(session: Session) -> Account:
        if session.account is None:
            raise _Refused(303, "/login")
        return session.account

    async def catalogue(request: Request) -> Response:
        session = current(request)
        models = [m for m in await call(admin.list_models) if m.visibility == "public"]
        return page(session, "catalogue.html", models=models)

    async def signup(request: Request) -> Response:
        session = current(request)
        if request.method == "GET":
            return page(session, "signup.html", error=None, email="")
        fields = await form(request, session)
        email = fields.get("email", "").strip().lower()
        password = fields.get("password", "")
        error = None
        if not _EMAIL.fullmatch(email):
            error = "Enter an e-mail address."
        elif not _MIN_PASSWORD <= len(password) <= _MAX_PASSWORD:
            error = f"The password needs {_MIN_PASSWORD} to {_MAX_PASSWORD} characters."
        account = None
        if error is None:
            account = await run_in_threadpool(store.create_account, email, password)
            if account is None:
                error = "That e-mail already has an account: log in."
        if account is None:
            return page(session, "signup.html", 400, error=error, email=email)
        return redirect(fresh(session, account), "/settings")

    def fresh(old: Session, account: Account | None) -> Session:
        """A new session replacing `old` (login, sign-up, logout): fixation stops here."""
        store.end_session(old.token)
        return store.new_session(account)

    async def login(request: Request) -> Response:
        session = current(request)
        if request.method == "GET":
            return page(session, "login.html", error=None, email="")
        fields = await form(request, session)
        email = fields.get("email", "").strip().lower()
        where = address(request)
        if limiter.blocked(email, where):
            return page(
                session,
                "login.html",
                429,
                error="Too many failed attempts: wait a few minutes.",
                email=email,
            )
        account = await run_in_threadpool(store.check_password, email, fields.get("password", ""))
        if account is None:
            limiter.failed(email, where)
            return page(session, "login.html", 401, error="Wrong e-mail or password.", email=email)
        return redirect(fresh(session, account), "/settings")

    async def logout(request: Request) -> Response:
        session = current(request)
        await form(request, session)
        return redirect(fresh(session, None), "/")

    async def settings(request: Request) -> Response:
        session = current(request)
        account = logged_in(session)
        new_key = None
        if request.method == "POST":
            await form(request, session)
            info, secret = await call(admin.create_key, "owner", f"portal:{account.email}")
            await run_in_threadpool(store.add_key, account, info.key_id)
            new_key = {"key_id": info.key_id, "secret": secret}
        return page(session, "settings.html", keys=await own_keys(account), new_key=new_key)

    async def own_keys(account: Account) -> list[ApiKeyInfo]:
        mine = await run_in_threadpool(store.key_ids, account)
        return [k for k in await call(admin.list_keys) if k.key_id in mine]

    async def revoke(request: Request) -> Response:
        session = current(request)
        account = logged_in(session)
        fields = await form(request, session)
        key_id = fields.get("key_id", "")
        if not _KEY_ID.fullmatch(key_id) or key_id not in store.key_ids(account):
            raise _Refused(404, "no such key")
        await call(admin.revoke_key, key_id)
        return redirect(session, "/settings")

    async def own_models(account: Account) -> list[ModelInfo]:
        mine = await run_in_threadpool(store.key_ids, account)
        return [m for m in await call(admin.list_models) if m.owner in mine]

    async def models(request: Request) -> Response:
        session = current(request)
        account = logged_in(session)
        return page(session, "models.html", models=await own_models(account))

    async def delete(request: Request) -> Response:
        session = current(request)
        account = logged_in(session)
        fields = await form(request, session)
        model_id, owner = fields.get("model_id", ""), fields.get("owner")
        found = [
            m
            for m in await own_models(account)
            if m.model_id == model_id and owner in (None, m.owner)
        ]
        if len(found) != 1:
            raise _Refused(404, "no such model")
        # Qualified: ids belong to their owners, and the admin key may use every tenant's "m".
        await call(admin.delete_model, f"{found[0].owner}/{model_id}")
        return redirect(session, "/models")

    async def asset(request: Request) -> Response:
        found = assets.get(request.path_params["name"])
        if found is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "max-age=3600"})

    def guarded(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def wrapped(request: Request) -> Response:
            try:
                response: Response = await handler(request)
                return response
            except _Refused as refused:
                session = current(request)
                if refused.status == 303:
                    return redirect(session, refused.message)
                return page(session, "error.html", refused.status, message=refused.message)
            except VeilError as exc:
                # The server's words (they never hold a secret); its status is not ours.
                return page(current(request), "error.html", 502, message=str(exc))

        return wrapped

    routes = [
        Route("/", guarded(catalogue), methods=["GET"]),
        Route("/signup", guarded(signup), methods=["GET", "POST"]),
        Route("/login", guarded(login), methods=["GET", "POST"]),
        Route("/logout", guarded(logout), methods=["POST"]),
        Route("/settings", guarded(settings), methods=["GET", "POST"]),
        Route("/settings/revoke", guarded(revoke), methods=["POST"]),
        Route("/models", guarded(models), methods=["GET"]),
        Route("/models/delete", guarded(delete), methods=["POST"]),
        Route("/static/{name:str}", asset, methods=["GET"]),
    ]
    return Starlette(routes=routes)


class _Refused(Exception):
    """A request the portal refuses: its status and the words shown (303: where to go)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
