"""``headwater serve --llm MODEL``: the LLM in the recommender's process, as one serving runtime.

One process holds the gRPC recommender (the DLRM), the LLM engine with its one KV block pool,
the LLM's HTTP endpoints (``/v1/rank``, ``/v1/completions``) and the rerank stage between them.
All LLM work (rerank, ``/v1/rank``, generation) enters the engine's one scheduler in its
:class:`batching.Priority` class; the DLRM's forwards hold the engine's steps back through one
:class:`batching.Arbiter` (a rerank step less long than generation), so Recommend keeps its
latency while the LLM is busy.

The rerank reads item texts (:mod:`serving.item_text`, from ``--item-text FILE`` and from text on
``hw.items``) and the live history (:mod:`serving.user_history`, from ``hw.actions``), which also
hands each interaction to the stage's blend-weight tuner (:mod:`serving.rerank_tuning`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from batching import Arbiter, Priority
from serving.item_text import ItemTextConfig, ItemTextFollower, ItemTexts
from serving.rerank import RerankConfig, RerankStage
from serving.rerank_tuning import ObservedHistory
from serving.user_history import HistoryConfig, HistoryFollower, UserHistory

log = logging.getLogger(__name__)

__all__ = ["LlmRuntimeConfig", "LlmRuntime"]


@dataclass
class LlmRuntimeConfig:
    """Where the LLM comes from and where its HTTP endpoints listen."""

    llm: str = field(default="", metadata={"help": "model folder (see `headwater llm convert`; `headwater llm random` writes a random one): run the LLM rerank stage and the LLM's HTTP endpoints in this process"})
    llm_port: int = field(default=8000, metadata={"help": "with --llm: port of /v1/rank and /v1/completions on --host (-1 = no HTTP endpoints)"})
    llm_gate_ms: float = field(default=20.0, metadata={"help": "with --llm: longest a generation step waits for in-flight DLRM scoring to finish (a /v1/rank step 2/3 of it, a rerank step 1/3)"})

    def validate(self) -> None:
        if self.llm_gate_ms < 0:
            raise ValueError("llm_gate_ms must be >= 0")


class LlmRuntime:
    """Builds and owns the LLM side of ``serve --llm``: engine, texts, history, stage, HTTP."""

    def __init__(self, cfg: LlmRuntimeConfig, engine_cfg: Any, rerank_cfg: RerankConfig,
                 text_cfg: ItemTextConfig, history_cfg: HistoryConfig, *, host: str = "127.0.0.1",
                 bootstrap_servers: str | None = None, actions_topic: str | None = None,
                 items_topic: str | None = None) -> None:
        from serving.http.engine_backend import EngineBackend

        cfg.validate()
        self.cfg = cfg
        self.arbiter = Arbiter(aging_s=cfg.llm_gate_ms / 1000.0 / Priority.GENERATE)
        self.backend = EngineBackend.from_model_dir(cfg.llm, config=engine_cfg)
        self.backend.arbiter = self.arbiter
        self.texts = ItemTexts(text_cfg.max_text_items, text_cfg.max_text_chars)
        if text_cfg.item_text:
            self.texts.load(text_cfg.item_text, text_cfg)
        self.text_follower: ItemTextFollower | None = None
        if text_cfg.item_text_topic and bootstrap_servers and items_topic:
            self.text_follower = ItemTextFollower(self.texts, bootstrap_servers, items_topic)
        self.history: UserHistory | None = None
        self.follower: HistoryFollower | None = None
        if history_cfg.history:
            self.history = ObservedHistory(history_cfg.history_users, history_cfg.history_per_user,
                                           history_cfg.history_ttl_s)
            if bootstrap_servers and actions_topic:
                self.follower = HistoryFollower(self.history, bootstrap_servers, actions_topic,
                                                history_cfg.history_ttl_s)
        self.stage = RerankStage(rerank_cfg, self.backend, self.texts, self.history)
        tuner = self.stage.tuner
        if tuner is not None and self.history is not None:
            self.history.observer = tuner.observe  # the clicks on reranked items are its outcomes
            if self.follower is not None:  # the replayed backlog is no outcome of this process's calls
                tuner.live = lambda: self.follower.caught_up
        self.host = host
        self.http: Any = None

    def start(self) -> "LlmRuntime":
        for follower in (self.follower, self.text_follower):
            if follower is not None:
                follower.start()
        if self.cfg.llm_port >= 0:
            from serving.http.app import create_app
            from serving.http.config import HttpServerConfig
            from serving.http.server import RunningServer

            app = create_app(self.backend, HttpServerConfig(host=self.host, port=self.cfg.llm_port),
                             special_tokens=self.backend.special_tokens)
            self.http = RunningServer(app, self.host, self.cfg.llm_port).start()
        return self

    @property
    def http_url(self) -> str | None:
        return None if self.http is None else self.http.url

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        for follower in (self.follower, self.text_follower):
            if follower is not None:
                follower.stop()
        self.backend.close()
