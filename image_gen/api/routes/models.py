"""The models of the registry, in OpenAI's list shape with our details."""

from __future__ import annotations

from fastapi import APIRouter

from image_gen.api.deps import CurrentCaller, Service
from image_gen.api.errors import ERROR_RESPONSES
from image_gen.api.schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"], responses=ERROR_RESPONSES)


@router.get("/models", response_model=ModelList)
def list_models(caller: CurrentCaller, service: Service) -> ModelList:
    return ModelList(data=[ModelCard.of(info) for info in service.models()])
