"""Trainer and serving meet only at the ``hw.params`` protocol (``paramsync``): serving imports
nothing of training but the model definition, and the protocol imports neither side.

Every import counts, also one inside a function (the graph is ``test_import_graph``'s).
"""

from __future__ import annotations

from test_import_graph import import_graph

SERVING_MAY_IMPORT_OF_TRAINING = {"training.model"}  # the model definition: the tower and score
PARAMSYNC_MAY_IMPORT = {"paramsync", "embedding_store", "streams"}


def _package(module: str) -> str:
    return module.split(".")[0]


def test_serving_imports_nothing_of_training_but_the_model_definition():
    graph = import_graph()
    allowed = SERVING_MAY_IMPORT_OF_TRAINING
    reached = {mod: sorted(t for t in deps if _package(t) == "training" and t not in allowed)
               for mod, deps in graph.items() if _package(mod) == "serving"}
    assert {m: d for m, d in reached.items() if d} == {}


def test_the_params_protocol_imports_neither_the_trainer_nor_serving():
    graph = import_graph()
    assert any(_package(m) == "paramsync" for m in graph)
    outside = {mod: sorted(t for t in deps if _package(t) not in PARAMSYNC_MAY_IMPORT)
               for mod, deps in graph.items() if _package(mod) == "paramsync"}
    assert {m: d for m, d in outside.items() if d} == {}


def test_training_imports_nothing_of_serving():
    graph = import_graph()
    reached = {mod: sorted(t for t in deps if _package(t) == "serving")
               for mod, deps in graph.items() if _package(mod) == "training"}
    assert {m: d for m, d in reached.items() if d} == {}
