"""The dashboard's HTTP side: a router any FastAPI app can include, and a standalone app around it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import HTMLResponse

from serving.dashboard.scraper import MetricsScraper, parse_sources

__all__ = ["DashboardConfig", "build_router", "create_app", "page_html"]


@dataclass
class DashboardConfig:
    """Settings of ``headwater dashboard``."""

    sources: str = field(default="", metadata={
        "help": "components to watch: name=url,... (url of a /metrics page, or host:port)"})
    host: str = field(default="127.0.0.1", metadata={"help": "bind address (loopback by default)"})
    port: int = field(default=8050, metadata={"help": "TCP port (0 picks a free one)"})
    interval_s: float = field(default=1.0, metadata={"help": "scrape every source this often"})
    history_s: float = field(default=900.0, metadata={"help": "seconds of history kept in memory"})
    rate_window_s: float = field(default=5.0, metadata={"help": "trailing window of rates and latency quantiles"})

    def validate(self) -> None:
        parse_sources(self.sources)  # raises ValueError on a malformed list
        if self.interval_s <= 0 or self.history_s <= 0 or self.rate_window_s <= 0:
            raise ValueError("interval_s, history_s and rate_window_s must be positive")

    def scraper(self) -> MetricsScraper:
        return MetricsScraper(parse_sources(self.sources), interval_s=self.interval_s,
                              history_s=self.history_s, rate_window_s=self.rate_window_s)


def page_html() -> str:
    """The self-contained page (inline JS + SVG; it loads nothing from other hosts)."""
    return resources.files("serving.dashboard").joinpath("page.html").read_text(encoding="utf-8")


def build_router(scraper: MetricsScraper) -> APIRouter:
    """``/`` (the page) and ``/api/series`` (JSON history) over ``scraper``; the page's requests
    are relative, so the router also works under a prefix."""
    router = APIRouter()
    html = page_html()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @router.get("/api/series")
    async def series(since: float = Query(-1.0, description="only points newer than this (s)")) -> dict:
        return scraper.series(since)

    return router


def create_app(scraper: MetricsScraper) -> FastAPI:
    """A standalone dashboard app; the scraper runs for the app's lifetime. ``/health`` for probes."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        scraper.start()
        try:
            yield
        finally:
            scraper.stop()

    app = FastAPI(title="Headwater dashboard", lifespan=lifespan)
    app.include_router(build_router(scraper))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "ticks": scraper.ticks, "sources": len(scraper.sources)}

    return app
