"""Shared route dependencies: the service, the settings and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from image_gen.service import GenerationService
from image_gen.settings import Settings

LOCAL_OWNER = "local"


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_owner(request: Request) -> str:
    """The caller. Single-user on loopback for now: every caller is the local user."""
    return LOCAL_OWNER


Service = Annotated[GenerationService, Depends(get_service)]
AppSettings = Annotated[Settings, Depends(get_settings)]
Owner = Annotated[str, Depends(get_owner)]
