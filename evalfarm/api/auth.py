"""Bearer tokens on every route but `/health`: 401 without a valid token, 403 without the scope."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from evalfarm.scheduler.tokens import Principal, authenticate

_bearer = HTTPBearer(auto_error=False, description="A token from `evalfarm token create NAME --scopes ...`.")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def require(scope: str) -> Callable[..., Principal]:
    """A dependency that admits the request's principal when its token grants `scope`."""

    def principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
        if credentials is None:
            raise HTTPException(401, "missing token: send 'Authorization: Bearer TOKEN' (`evalfarm token create`)",
                                headers=_CHALLENGE)
        who = authenticate(request.app.state.farm.ctx.sessions, credentials.credentials)
        if who is None:
            raise HTTPException(401, "invalid or revoked token", headers=_CHALLENGE)
        if not who.allows(scope):
            raise HTTPException(403, f"token {who.name!r} lacks the {scope!r} scope")
        return who

    return principal
