"""The asynchronous LLM explainer worker (see the explainer issue); nothing here yet."""
