"""LLM backends for the explainer: ``openai:BASE_URL`` (any OpenAI-compatible chat endpoint:
vLLM, llama.cpp server, Ollama, a hosted API) and ``hf:PATH`` (a local HuggingFace causal LM,
never downloaded). Model name and key come from ``INTERLATENT_LLM_MODEL`` and
``INTERLATENT_LLM_API_KEY`` (or ``OPENAI_API_KEY``)."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["BackendError", "OpenAIBackend", "HFBackend", "make_backend", "SYSTEM"]

log = logging.getLogger(__name__)

SYSTEM = (
    "You explain what a unit inside a reinforcement-learning policy detects. Answer with a short label on the first "
    "line, then one or two sentences that name the environment metrics involved and whether they are high or low."
)


class BackendError(RuntimeError):
    """A backend that cannot answer; the message says why."""


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 2,
        max_tokens: int = 120,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model or os.environ.get("INTERLATENT_LLM_MODEL", "default")
        self.api_key = api_key or os.environ.get("INTERLATENT_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout_s, self.retries, self.max_tokens = timeout_s, retries, max_tokens

    def complete(self, prompt: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "temperature": 0,
                "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            }
        ).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
        err: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    reply = json.loads(resp.read())
                return str(reply["choices"][0]["message"]["content"])
            except (urllib.error.URLError, OSError, TimeoutError, ValueError, KeyError, IndexError) as e:
                err = e
                log.warning("LLM call to %s failed (try %d of %d): %s", self.url, attempt + 1, self.retries + 1, e)
                if attempt < self.retries:
                    time.sleep(min(4.0, 0.25 * 2**attempt))
        raise BackendError(f"{self.url} did not answer after {self.retries + 1} tries: {err}")


class HFBackend:
    name = "hf"

    def __init__(self, path: str, *, max_new_tokens: int = 48) -> None:
        p = Path(path)
        if not (p / "config.json").exists():
            raise BackendError(f"hf:{path} is not a local model directory (no config.json); models are never downloaded")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        self.lm = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True).eval()
        self.model = p.name
        self.max_new_tokens = max_new_tokens

    def complete(self, prompt: str) -> str:
        import torch

        limit = getattr(self.lm.config, "n_positions", None) or getattr(self.lm.config, "max_position_embeddings", 1024)
        ids = self.tok(
            f"{SYSTEM}\n{prompt}\n", return_tensors="pt", truncation=True, max_length=max(8, limit - self.max_new_tokens)
        )
        with torch.no_grad():
            out = self.lm.generate(
                **ids,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id,
            )
        return self.tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def make_backend(spec: str) -> OpenAIBackend | HFBackend | None:
    """``rules`` -> None (the deterministic backend), ``openai:URL``, ``hf:PATH``."""
    if spec == "rules":
        return None
    kind, _, arg = spec.partition(":")
    if kind == "openai" and arg:
        return OpenAIBackend(arg)
    if kind == "hf" and arg:
        return HFBackend(arg)
    raise BackendError(f"unknown backend {spec!r}: use rules, hf:PATH or openai:BASE_URL")
