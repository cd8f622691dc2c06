"""The caller's webhook signing secret (each job's deliveries are at GET /v1/jobs/{id}/webhook)."""

from __future__ import annotations

from fastapi import APIRouter

from image_gen.api.deps import CurrentCaller, Webhooks
from image_gen.api.errors import ERROR_RESPONSES
from image_gen.api.schemas import WebhookSecret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=ERROR_RESPONSES)


@router.get("/secret", response_model=WebhookSecret)
def webhook_secret(caller: CurrentCaller, webhooks: Webhooks) -> WebhookSecret:
    """The secret that signs this key's webhooks: check `X-ImageGen-Signature` with it."""
    return WebhookSecret(secret=webhooks.secret_for(caller.owner))
