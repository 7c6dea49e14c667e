"""Prompt routing: zero-shot classification, LLMLingua compression, model selection."""

from chatfleet.serving.routing.router import PreviousRoute, Router, RoutingDecision

__all__ = ["PreviousRoute", "Router", "RoutingDecision"]
