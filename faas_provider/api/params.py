"""Reading the parts of a request every handler needs: JSON bodies and the namespace."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from faas_provider.api.keys import SETTINGS
from faas_provider.api.limits import system_limit
from faas_provider.models import check_dns_label, namespace_or_default

M = TypeVar("M", bound=BaseModel)


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse the body as JSON into `model`; bad JSON or fields raise (answered 400), a body
    past the /system limit 413."""
    raw = await system_limit(request.app[SETTINGS]).read(request)
    if not raw.strip():
        raise web.HTTPBadRequest(text="request body is empty: send a JSON object")
    try:
        document: Any = json.loads(raw)
    except json.JSONDecodeError as error:
        raise web.HTTPBadRequest(text=f"request body is not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise web.HTTPBadRequest(text=f"request body is not UTF-8 JSON: {error}") from None
    except ValueError:  # what is left: an integer past Python's 4300 digits
        raise web.HTTPBadRequest(text="request body has a number of over 4300 digits") from None
    except RecursionError:
        raise web.HTTPBadRequest(text="request body is nested too deeply") from None
    if not isinstance(document, dict):
        raise web.HTTPBadRequest(text="request body must be a JSON object")
    return model.model_validate(document)


def namespace_param(request: web.Request, body_value: str | None = None) -> str:
    """The namespace from the query, else from the body, else the default; a DNS label."""
    return dns_label(
        namespace_or_default(request.query.get("namespace") or body_value), "namespace"
    )


def dns_label(value: str, what: str) -> str:
    """`value` if it is a DNS-1123 label, else 400 naming `what`."""
    try:
        return check_dns_label(value, what)
    except ValueError as error:
        raise web.HTTPBadRequest(text=str(error)) from error
