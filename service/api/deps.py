"""Dependency providers: everything a route needs comes from here."""

from __future__ import annotations

import secrets

from fastapi import Request

from service.errors import ApiError


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


async def require_key(request: Request) -> str | None:
    keys = request.app.state.settings.api_keys
    if not keys:
        return None
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and any(secrets.compare_digest(token.strip(), k) for k in keys):
        return token.strip()
    raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
