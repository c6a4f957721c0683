"""The portal's pages against an in-memory stand-in for the veil server's admin API (the real
server is driven in tests/integration/test_portal.py): CSRF on every form, session fixation,
logout, login limits, escaping, and that a user sees and touches only their own keys and models."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from argon2 import PasswordHasher
from starlette.testclient import TestClient

from veil.client.responses import ApiKeyInfo, ModelInfo
from veil.errors import NotFoundError
from veil.portal.app import COOKIE, LoginLimiter, build_portal
from veil.portal.store import PortalStore

PASSWORD = "correct horse battery"


class FakeAdmin:
    """The admin API's behaviour, in memory: keys get ids, secrets are returned once."""

    def __init__(self) -> None:
        self.keys: dict[str, ApiKeyInfo] = {}
        self.models: list[ModelInfo] = []

    def create_key(self, role: str, name: str | None = None) -> tuple[ApiKeyInfo, str]:
        key_id = f"{len(self.keys):016x}"
        self.keys[key_id] = ApiKeyInfo(key_id, role, name, 1.7e9, None, None)
        return self.keys[key_id], f"veil_{key_id}_{'ab' * 32}"

    def list_keys(self) -> list[ApiKeyInfo]:
        return list(self.keys.values())

    def revoke_key(self, key_id: str) -> None:
        k = self.keys[key_id]
        self.keys[key_id] = ApiKeyInfo(k.key_id, k.role, k.name, k.created_at, 1.8e9, None)

    def list_models(self) -> list[ModelInfo]:
        return list(self.models)

    def delete_model(self, model_id: str) -> None:
        # The portal names a tenant's model as veil's admin must: "<owner key id>/<id>".
        owner, _, plain = model_id.rpartition("/")
        found = [m for m in self.models if (m.owner, m.model_id) == (owner, plain)]
        if not found:
            raise NotFoundError(404, f"unknown model id {model_id!r}")
        self.models = [m for m in self.models if m not in found]


def model(model_id: str, owner: str | None, visibility: str = "public") -> ModelInfo:
    return ModelInfo(model_id, model_id, bytes(range(32)), 123, (), (), owner, visibility)


@pytest.fixture
def admin() -> FakeAdmin:
    return FakeAdmin()


@pytest.fixture
def app(admin: FakeAdmin) -> Iterator[TestClient]:
    # Cheap Argon2id parameters: the production defaults cost ~50 ms a hash.
    store = PortalStore(":memory:", hasher=PasswordHasher(time_cost=1, memory_cost=64))
    limiter = LoginLimiter(per_email=3, per_address=5)
    with TestClient(
        build_portal(store, admin, login_limiter=limiter), base_url="https://testserver"
    ) as client:
        yield client
    store.close()


def csrf(client: TestClient, path: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)
    assert found is not None
    return found.group(1)


def signup(client: TestClient, email: str = "alice@example.com") -> None:
    token = csrf(client, "/signup")
    r = client.post("/signup", data={"csrf": token, "email": email, "password": PASSWORD})
    assert r.status_code == 200, r.text  # followed the 303 to /settings
    assert r.url.path == "/settings"


def create_key(client: TestClient) -> str:
    r = client.post("/settings", data={"csrf": csrf(client, "/settings")})
    found = re.search(r'<code id="secret">([^<]+)</code>', r.text)
    assert found is not None
    return found.group(1)


def test_cookie_flags_and_headers(app: TestClient) -> None:
    r = app.get("/login")
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
        assert flag.lower() in cookie.lower()
    assert "domain" not in cookie.lower()
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"


def test_signup_create_key_shown_once_and_revoke(app: TestClient, admin: FakeAdmin) -> None:
    signup(app)
    secret = create_key(app)
    key_id = secret.split("_")[1]
    assert admin.keys[key_id].role == "owner"
    assert admin.keys[key_id].name == "portal:alice@example.com"
    page = app.get("/settings").text
    assert key_id in page
    assert secret not in page  # shown once
    token = csrf(app, "/settings")
    r = app.post("/settings/revoke", data={"csrf": token, "key_id": key_id})
    assert r.status_code == 200
    assert admin.keys[key_id].revoked_at is not None
    assert "revoked" in r.text


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/signup", {"email": "eve@example.com", "password": PASSWORD}),
        ("/login", {"email": "alice@example.com", "password": PASSWORD}),
        ("/settings", {}),
        ("/settings/revoke", {"key_id": "0000000000000000"}),
        ("/models/delete", {"model_id": "m"}),
        ("/logout", {}),
    ],
)
@pytest.mark.parametrize("token", [None, "", "forged"])
def test_every_form_needs_the_csrf_token(
    app: TestClient, admin: FakeAdmin, path: str, fields: dict[str, str], token: str | None
) -> None:
    signup(app)
    create_key(app)
    admin.models.append(model("m", "0000000000000000"))
    keys_before = dict(admin.keys)
    data = fields if token is None else {**fields, "csrf": token}
    r = app.post(path, data=data)
    assert r.status_code == 403
    assert "form expired" in r.text
    assert admin.keys == keys_before
    assert [m.model_id for m in admin.models] == ["m"]
    assert app.get("/settings").url.path == "/settings"  # still logged in


def test_session_fixation(app: TestClient) -> None:
    planted = app.get("/login").cookies[COOKIE]
    token = csrf(app, "/login")
    signup(app)  # the session given before sign-up is replaced
    after = app.cookies[COOKIE]
    assert after != planted
    # The planted token opens nothing.
    attacker = TestClient(app.app, base_url="https://testserver")
    attacker.cookies.set(COOKIE, planted)
    assert attacker.get("/settings", follow_redirects=False).status_code == 303
    assert token  # the pre-login CSRF token was for the old session only
    r = app.post("/logout", data={"csrf": token})
    assert r.status_code == 403


def test_logout_ends_the_session(app: TestClient) -> None:
    signup(app)
    old = app.cookies[COOKIE]
    r = app.post("/logout", data={"csrf": csrf(app, "/settings")})
    assert r.url.path == "/"
    assert app.get("/settings", follow_redirects=False).status_code == 303
    replay = TestClient(app.app, base_url="https://testserver")
    replay.cookies.set(COOKIE, old)
    assert replay.get("/settings", follow_redirects=False).headers["location"] == "/login"


def test_login_rate_limited(app: TestClient) -> None:
    signup(app, "bob@example.com")
    app.post("/logout", data={"csrf": csrf(app, "/settings")})
    for _ in range(3):
        token = csrf(app, "/login")
        r = app.post("/login", data={"csrf": token, "email": "bob@example.com", "password": "x"})
        assert r.status_code == 401
    token = csrf(app, "/login")
    r = app.post("/login", data={"csrf": token, "email": "bob@example.com", "password": PASSWORD})
    assert r.status_code == 429  # even the right password, until the window passes
    assert "Too many failed attempts" in r.text


def test_login_limiter_window() -> None:
    t = [0.0]
    limiter = LoginLimiter(per_email=2, per_address=3, window_s=10, now=lambda: t[0])
    limiter.failed("a", "1.2.3.4")
    limiter.failed("a", "1.2.3.4")
    assert limiter.blocked("a", "5.6.7.8")
    assert not limiter.blocked("b", "5.6.7.8")
    limiter.failed("b", "1.2.3.4")
    assert limiter.blocked("c", "1.2.3.4")  # the address's limit
    t[0] = 10.5
    assert not limiter.blocked("a", "1.2.3.4")


def test_wrong_password_and_unknown_email_look_alike(app: TestClient) -> None:
    signup(app, "carol@example.com")
    app.post("/logout", data={"csrf": csrf(app, "/settings")})
    answers = []
    for email in ("carol@example.com", "nobody@example.com"):
        token = csrf(app, "/login")
        r = app.post("/login", data={"csrf": token, "email": email, "password": "wrong-password"})
        answers.append((r.status_code, "Wrong e-mail or password." in r.text))
    assert answers == [(401, True), (401, True)]


@pytest.mark.parametrize(
    ("email", "password", "words"),
    [
        ("not-an-email", PASSWORD, "Enter an e-mail address."),
        ("d@example.com", "short", "The password needs 12"),
    ],
)
def test_signup_refusals(app: TestClient, email: str, password: str, words: str) -> None:
    token = csrf(app, "/signup")
    r = app.post("/signup", data={"csrf": token, "email": email, "password": password})
    assert r.status_code == 400
    assert words in r.text


def test_duplicate_signup(app: TestClient) -> None:
    signup(app)
    app.post("/logout", data={"csrf": csrf(app, "/settings")})
    token = csrf(app, "/signup")
    data = {"csrf": token, "email": "ALICE@example.com", "password": PASSWORD}
    r = app.post("/signup", data=data)
    assert r.status_code == 400
    assert "already has an account" in r.text


def test_pages_need_login(app: TestClient) -> None:
    for path in ("/settings", "/models"):
        r = app.get(path, follow_redirects=False)
        assert r.status_code == 303
        assert r.headers["location"] == "/login"


def test_everything_shown_is_escaped(app: TestClient, admin: FakeAdmin) -> None:
    evil = "<script>alert(1)</script>"
    admin.models.append(ModelInfo(evil, evil, bytes(32), 1, (), (), None, "public"))
    page = app.get("/").text
    assert evil not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    token = csrf(app, "/signup")
    r = app.post("/signup", data={"csrf": token, "email": '"><b>x@y', "password": "short"})
    assert '"><b>' not in r.text
    assert "&#34;&gt;&lt;b&gt;x@y" in r.text


def test_users_see_and_delete_only_their_own(app: TestClient, admin: FakeAdmin) -> None:
    signup(app, "alice@example.com")
    mine = create_key(app).split("_")[1]
    other = admin.create_key("owner", "portal:mallory@example.com")[0].key_id
    admin.models += [
        model("alice-m", mine, "restricted"),
        model("mallory-m", other),
        model("alice-m", other),  # the same id, another tenant's: left alone
    ]
    page = app.get("/models").text
    assert "alice-m" in page
    assert "mallory-m" not in page
    assert other not in app.get("/settings").text
    token = csrf(app, "/models")
    r = app.post("/models/delete", data={"csrf": token, "model_id": "mallory-m"})
    assert r.status_code == 404
    r = app.post("/settings/revoke", data={"csrf": token, "key_id": other})
    assert r.status_code == 404
    assert admin.keys[other].revoked_at is None
    r = app.post("/models/delete", data={"csrf": token, "model_id": "alice-m", "owner": other})
    assert r.status_code == 404
    r = app.post("/models/delete", data={"csrf": token, "model_id": "alice-m", "owner": mine})
    assert r.status_code == 200
    assert [(m.model_id, m.owner) for m in admin.models] == [
        ("mallory-m", other),
        ("alice-m", other),
    ]


def test_catalogue_lists_public_models_only(app: TestClient, admin: FakeAdmin) -> None:
    admin.models += [model("open", "k1"), model("closed", "k1", "restricted")]
    page = app.get("/").text
    assert "open" in page
    assert bytes(range(32)).hex() in page  # the hash in hex
    assert "closed" not in page


def test_static_assets(app: TestClient) -> None:
    assert "clipboard" in app.get("/static/portal.js").text
    assert app.get("/static/portal.css").status_code == 200
    assert app.get("/static/..%2fapp.py").status_code == 404


def test_sessions_expire_and_are_pruned() -> None:
    t = [1000.0]
    store = PortalStore(
        ":memory:", now=lambda: t[0], hasher=PasswordHasher(time_cost=1, memory_cost=64)
    )
    account = store.create_account("e@example.com", PASSWORD)
    assert account is not None
    visitor, user = store.new_session(), store.new_session(account)
    t[0] += 1801  # past a visitor's lifetime, within a logged-in one
    assert store.session(visitor.token) is None
    found = store.session(user.token)
    assert found is not None
    assert found.account == account
    store.new_session()  # prunes the expired visitor row
    rows = store._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
    assert rows == 2
    t[0] += 8 * 3600
    assert store.session(user.token) is None
    store.close()
