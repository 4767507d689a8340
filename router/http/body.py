"""JSON request bodies parsed and validated on a worker thread instead of the event loop that serves every stream:
a 3 MB message list is tens of milliseconds of parsing and validation. Documented in the OpenAPI schema as a
plain FastAPI body would be (`documented_bodies`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def threaded_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A FastAPI dependency: the request's JSON body as `model`, parsed off the event loop; a body that is not
    valid JSON or not a valid `model` is a RequestValidationError (400), as FastAPI's own body parsing gives."""

    async def parse(request: Request) -> M:
        raw = await request.body()
        try:
            return await asyncio.to_thread(model.model_validate_json, raw)
        except ValidationError as e:
            errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
            raise RequestValidationError(errors) from None

    return parse


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route whose body `threaded_body(model)` parses."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def documented_bodies(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Adds `models` (and the models they use) to the app's OpenAPI components, for `body_doc`'s references."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in doc.pop("$defs", {}).items():
                    components.setdefault(name, sub)
                components[model.__name__] = doc
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
