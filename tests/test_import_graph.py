"""The layering the README states, read from the source by launch/import_graph.py (ast; nothing imported)."""
import importlib.util
import os

from conftest import REPO_DIR

spec = importlib.util.spec_from_file_location("import_graph", os.path.join(REPO_DIR, "launch", "import_graph.py"))
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


def test_the_layering_holds_and_a_broken_rule_is_reported():
    edges = import_graph.graph(import_graph.modules())
    assert import_graph.layering_errors(edges) == []
    serving = import_graph.reached(edges, "musiclm_jax.serving.bundle", lazy=False)
    assert "musiclm_jax.generation.pipeline" in serving and not {"tensorflow", "seqio", "musiclm_jax.data"} & set(serving)
    # The checker sees a rule broken: a network that imports the trainer, an inference module that loads seqio.
    broken = dict(edges)
    transformer = "musiclm_jax.networks.transformer"
    broken[transformer] = edges[transformer] + [("musiclm_jax.train", False)]
    broken["musiclm_jax.generation.pipeline"] = edges["musiclm_jax.generation.pipeline"] + [("seqio", False)]
    errors = import_graph.layering_errors(broken)
    assert any("networks.transformer imports musiclm_jax.train" in e for e in errors)
    assert "importing musiclm_jax.serving.bundle loads seqio" in errors  # through pipeline
    # A lazy import (inside a function) is not loaded at import time.
    lazy = dict(edges, **{"musiclm_jax.generation.pipeline": edges["musiclm_jax.generation.pipeline"] + [("seqio", True)]})
    assert import_graph.layering_errors(lazy) == []
