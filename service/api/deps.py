"""Dependency providers: everything a route needs comes from here."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from fastapi import Request

from service.errors import ApiError


@dataclass(frozen=True)
class Principal:
    tenant: str   # a digest of the key: records never hold the key itself
    admin: bool

    def owns(self, rec: dict) -> bool:
        return self.admin or rec.get("owner", "public") == self.tenant


PUBLIC = Principal("public", admin=True)


def tenant_of(key: str) -> str:
    return "t-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def settings(request: Request):
    return request.app.state.settings


def store(request: Request):
    return request.app.state.store


def queue(request: Request):
    return request.app.state.queue


def engines(request: Request):
    return request.app.state.engines


def chat(request: Request):
    return request.app.state.chat


def sessions(request: Request):
    return request.app.state.sessions


def session_serving(request: Request):
    return request.app.state.session_serving


def scenes(request: Request):
    return request.app.state.scenes


def scene_serving(request: Request):
    return request.app.state.scene_serving


def streams(request: Request):
    return request.app.state.streams


def completions(request: Request):
    return request.app.state.completions


async def require_key(request: Request) -> Principal:
    keys = request.app.state.keys
    if not keys:
        return PUBLIC
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        for key, admin in keys.items():
            if secrets.compare_digest(token.encode(), key.encode()):
                return Principal(tenant_of(key), admin)
    raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def require_admin(request: Request) -> Principal:
    who = await require_key(request)
    if not who.admin:
        raise ApiError(403, "this route needs an admin key", code="admin_only")
    return who
