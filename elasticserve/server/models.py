"""/v1/models and /v1/shapes: the base model, its shapes, their quality and latency."""

from __future__ import annotations

from fastapi import APIRouter

from .errors import APIError, error_responses
from .protocol import (
    ModelCard,
    ModelList,
    ShapeCard,
    ShapeList,
)
from .state import ServerState


def _model_cards(server: ServerState) -> ModelList:
    max_len = server.bundle.max_model_len
    cards = [ModelCard(id=server.name, root=server.name, max_model_len=max_len)]
    for spec in server.bundle.specs:
        cards.append(
            ModelCard(
                id=f"{server.name}@{spec.name}",
                root=server.name,
                parent=server.name,
                max_model_len=max_len,
            )
        )
    return ModelList(data=cards)


def _shape_cards(server: ServerState) -> ShapeList:
    lora = server.bundle.model.lora
    adapted = set(lora.routes) if lora is not None else set()
    return ShapeList(
        data=[
            ShapeCard(
                id=f"{server.name}@{spec.name}",
                shape=spec.name,
                shape_id=spec.id,
                depth=spec.shape.depth,
                width=spec.shape.width,
                precision=spec.shape.precision,
                weight_fraction=round(spec.weight_fraction, 6),
                weight_bytes=server.bundle.weight_bytes(spec),
                ppl=spec.ppl,
                adapter=spec.id in adapted,
                chat_kl=spec.chat.get("kl") if spec.chat else None,
                chat_agree=spec.chat.get("agree") if spec.chat else None,
                latency=dict(server.shape_latency[spec.name])
                if spec.name in server.shape_latency
                else None,
            )
            for spec in server.bundle.specs
        ]
    )


def router(server: ServerState) -> APIRouter:
    """The model and shape listings of `server`."""
    routes = APIRouter()

    @routes.get("/v1/models", response_model=ModelList, responses=error_responses(401))
    async def list_models() -> ModelList:
        return _model_cards(server)

    @routes.get(
        "/v1/models/{model:path}", response_model=ModelCard, responses=error_responses(401, 404)
    )
    async def retrieve_model(model: str) -> ModelCard:
        for card in _model_cards(server).data:
            if card.id == model:
                return card
        raise APIError(404, f"The model `{model}` does not exist", code="model_not_found")

    @routes.get("/v1/shapes", response_model=ShapeList, responses=error_responses(401))
    async def list_shapes() -> ShapeList:
        return _shape_cards(server)

    return routes
