"""The provider's errors: each carries the HTTP status the API answers with."""

from __future__ import annotations


class ProviderError(Exception):
    """An error the API turns into an HTTP answer with `status` and the message as body."""

    status = 500


class InvalidRequest(ProviderError):
    """The request is well-formed JSON but asks for something that cannot be done (400)."""

    status = 400


class NotFound(ProviderError):
    """The function, secret or namespace does not exist (404)."""

    status = 404


class Conflict(ProviderError):
    """The function, secret or namespace exists already, or is in use (409)."""

    status = 409


class Unavailable(ProviderError):
    """The function exists but no replica can take the request now (503)."""

    status = 503
