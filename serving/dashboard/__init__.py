"""Live dashboard: scrapes the components' ``/metrics`` and draws AUC, log loss, throughput,
freshness, serving latency and LLM load on a self-contained page."""

from serving.dashboard.app import DashboardConfig, build_router, create_app, page_html
from serving.dashboard.scraper import SERIES, MetricsScraper, SeriesSpec, bucket_quantile, parse_sources

__all__ = ["DashboardConfig", "MetricsScraper", "SERIES", "SeriesSpec", "build_router", "bucket_quantile",
           "create_app", "page_html", "parse_sources"]
