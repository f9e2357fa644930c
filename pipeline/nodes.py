"""The names of the stage graph's nodes and of the files every node's output folder may hold.

Each student is the node ``distill/<name>``, each derived cache ``tier/<name>``; a node whose
build failed records why in ``failed.json`` in its output folder.  Stages name the nodes they read
through these, without importing the graph that runs them.
"""

from __future__ import annotations

DEFAULT_CONFIG = "pipeline.yaml"  # the pipeline file a command reads without -c, and init writes
STAGES = ("prepare", "teacher", "extract", "distill", "analyze")
STUDENT = "distill/"  # student nodes are named distill/<student name>
TIER = "tier/"  # derived caches (config ``tiers``) are nodes tier/<tier name>, upstream extract
FAILED = "failed.json"


def student_node(name: str) -> str:
    return STUDENT + name


def student_name(node: str) -> str | None:
    """The student a node ``distill/<name>`` trains, or None for a stage."""
    return node[len(STUDENT):] if node.startswith(STUDENT) else None


def tier_node(name: str) -> str:
    return TIER + name


def tier_name(node: str) -> str | None:
    """The tier a node ``tier/<name>`` derives, or None for another node."""
    return node[len(TIER):] if node.startswith(TIER) else None
