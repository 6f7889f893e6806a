"""Who may see the dashboard's pages: a `read` token, entered once in a login form and kept in a cookie.

The cookie holds the token itself and is checked like a bearer token on every page request (by its
SHA-256, `scheduler.tokens.authenticate`), so revoking the token ends its sessions at once and the server
keeps no session state and needs no secret of its own. It is HttpOnly (no script reads it), SameSite=Strict
(no other site's page or link sends it), Path=/ and Secure when the request came over https. It admits to
the `/ui` pages only: the `/v1` JSON API and `/metrics` take bearer tokens and nothing else, so no page of
another site can make a browser act on them. The pages change nothing; the two forms that post (login and
logout) refuse requests that browsers mark as sent from another site.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, quote

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from evalfarm.scheduler.tokens import READ, SUBMIT, Principal, authenticate

COOKIE = "evalfarm_token"
COOKIE_MAX_AGE_S = 12 * 3600  #: a browser forgets the token after this long (or when the token is revoked)
LOGIN_PATH = "/ui/login"
HOME = "/ui"
MAX_TOKEN_CHARS = 200  #: tokens are ~47 characters; anything far longer is refused before it is hashed
#: a local page of the dashboard: `/ui`, `/ui/...` or `/ui?...`; never `//host`, a scheme, a backslash or a space
_LOCAL_PAGE = re.compile(r"^/ui(?:[/?][^\\\s]*)?$")


class LoginRequired(Exception):
    """A page was asked for without a valid login: the answer is a redirect to the login form."""

    def __init__(self, next_path: str, *, clear: bool) -> None:
        super().__init__(next_path)
        self.next_path, self.clear = next_path, clear


def viewer(request: Request) -> Principal:
    """A dependency of every page: the principal of the request's login cookie, which must grant `read`."""
    token = request.cookies.get(COOKIE)
    who = check_token(request, token) if token else None
    if who is None:
        raw = request.scope.get("raw_path")  # as sent: a run name's %2F stays inside its path segment
        here = (raw.decode("latin-1") if raw else quote(request.url.path)) + (
            f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(here, clear=token is not None)
    return who


def check_token(request: Request, token: str) -> Principal | None:
    """The principal of `token` when it is active and only reads, else None: a browser keeps the cookie for
    hours, so it must not hold a token that could submit or cancel jobs."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None
    who = authenticate(request.app.state.farm.ctx.sessions, token)
    return who if who is not None and who.allows(READ) and not who.allows(SUBMIT) else None


def safe_next(value: str | None) -> str:
    """Where to go after logging in: `value` when it is a page of this dashboard, else the runs page. Anything
    else (`https://evil.example/`, `//evil.example`, `/\\evil.example`) would make the login an open redirect."""
    if value and _LOCAL_PAGE.match(value) and "//" not in value:
        return value
    return HOME


def login_url(next_path: str) -> str:
    return LOGIN_PATH if next_path == HOME else f"{LOGIN_PATH}?next={quote(next_path, safe='/')}"


def redirect_to_login(request: Request, exc: LoginRequired) -> Response:
    """The answer to `LoginRequired`: 303 to the form, remembering the page; a cookie that failed is removed."""
    response = RedirectResponse(login_url(safe_next(exc.next_path)), status_code=303)
    if exc.clear:
        clear_login_cookie(response, request)
    return response


def cross_site(request: Request) -> bool:
    """Whether the browser says this request came from another site's page (Fetch Metadata): such posts to
    the login and logout forms are refused, so that no site can log a visitor in or out."""
    return request.headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site")


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of an `application/x-www-form-urlencoded` body (the login form's), first value of each."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


async def log_in(request: Request, token: str) -> Principal | None:
    return await run_in_threadpool(check_token, request, token.strip())


def set_login_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(COOKIE, token.strip(), max_age=COOKIE_MAX_AGE_S, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def clear_login_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")
