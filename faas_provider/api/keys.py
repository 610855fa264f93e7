"""Typed keys for what the app factory stores on the application."""

from __future__ import annotations

from aiohttp import web

from faas_provider.api.resolver import Resolver
from faas_provider.autoscale.loop import Autoscaler
from faas_provider.backends.base import Backend
from faas_provider.metrics import ProviderMetrics
from faas_provider.settings import Settings
from faas_provider.upstream import UpstreamPool

BACKEND = web.AppKey("backend", Backend)
SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", ProviderMetrics)
UPSTREAM = web.AppKey("upstream", UpstreamPool)
RESOLVER = web.AppKey("resolver", Resolver)
AUTOSCALER = web.AppKey("autoscaler", Autoscaler)
