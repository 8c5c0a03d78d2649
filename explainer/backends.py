"""LLM backends for the explainer: ``openai:BASE_URL`` (any OpenAI-compatible chat endpoint:
vLLM, llama.cpp server, Ollama, a hosted API) and ``hf:PATH`` (a local HuggingFace causal LM,
never downloaded). Model name and key come from ``INTERLATENT_LLM_MODEL`` and
``INTERLATENT_LLM_API_KEY`` (or ``OPENAI_API_KEY``).

A backend answers ``complete(prompt, system=..., tags=...)``; ``tags`` go to an HTTP endpoint as
``X-Interlatent-*`` headers (which worker, which job), so its logs say who asked what."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

__all__ = ["BackendError", "OpenAIBackend", "HFBackend", "make_backend", "SYSTEM", "MAX_REPLY_BYTES"]

log = logging.getLogger(__name__)

SYSTEM = (
    "You explain what a unit inside a reinforcement-learning policy detects, from the steps where it activates. "
    "You answer in exactly the format asked for, with no other text."
)
MAX_REPLY_BYTES = 1 << 20  # a chat completion of a few hundred tokens is a few KiB: more is a broken server


class BackendError(RuntimeError):
    """A backend that cannot answer, or cannot be built; the message says why."""


def _read_capped(resp: object, cap: int, deadline: float) -> bytes:
    """The body, refused past ``cap`` bytes or past the deadline (a server trickling bytes would
    otherwise reset the socket timeout with every chunk)."""
    length = getattr(resp, "headers", {}).get("Content-Length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise BackendError(f"the reply is {length} bytes, over the {cap}-byte cap")
    chunks, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("the reply took longer than the timeout")
        chunk = resp.read(min(65536, cap + 1 - total))  # type: ignore[attr-defined]
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            raise BackendError(f"the reply is over the {cap}-byte cap")


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
        max_tokens: int = 300,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model or os.environ.get("INTERLATENT_LLM_MODEL", "default")
        self.api_key = api_key or os.environ.get("INTERLATENT_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout_s, self.retries, self.max_tokens, self.max_reply_bytes = timeout_s, retries, max_tokens, max_reply_bytes

    def complete(self, prompt: str, *, system: str = SYSTEM, tags: Mapping[str, str] | None = None) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "temperature": 0,
                "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for k, v in (tags or {}).items():
            headers[f"X-Interlatent-{k}"] = "".join(ch for ch in str(v) if ch.isprintable())[:200]
        err: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    reply = json.loads(_read_capped(resp, self.max_reply_bytes, time.monotonic() + self.timeout_s))
                return str(reply["choices"][0]["message"]["content"])
            except BackendError as e:  # an over-long reply: the same server would send it again
                raise BackendError(f"{self.url}: {e}") from e
            except (urllib.error.URLError, OSError, TimeoutError, ValueError, KeyError, IndexError, TypeError) as e:
                err = e
                log.warning("LLM call to %s failed (try %d of %d): %s", self.url, attempt + 1, self.retries + 1, e)
                if attempt < self.retries:
                    time.sleep(min(4.0, 0.25 * 2**attempt))
        raise BackendError(f"{self.url} did not answer after {self.retries + 1} tries: {err}")


class HFBackend:
    name = "hf"

    def __init__(self, path: str, *, max_new_tokens: int = 160) -> None:
        p = Path(path)
        if not (p / "config.json").exists():
            raise BackendError(f"hf:{path} is not a local model directory (no config.json); models are never downloaded")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        self.lm = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True).eval()
        self.model = p.name
        self.max_new_tokens = max_new_tokens

    def complete(self, prompt: str, *, system: str = SYSTEM, tags: Mapping[str, str] | None = None) -> str:
        import torch

        limit = getattr(self.lm.config, "n_positions", None) or getattr(self.lm.config, "max_position_embeddings", 1024)
        ids = self.tok(
            f"{system}\n{prompt}\n", return_tensors="pt", truncation=True, max_length=max(8, limit - self.max_new_tokens)
        )
        with torch.no_grad():
            out = self.lm.generate(
                **ids,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id,
            )
        return self.tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


Backend = OpenAIBackend | HFBackend


def make_backend(spec: str, *, timeout_s: float = 30.0, retries: int = 2) -> Backend | None:
    """``rules`` -> None (the deterministic backend), ``openai:URL``, ``hf:PATH``; anything else,
    or an ``hf:`` path that is not a model directory, is a :class:`BackendError`."""
    if spec == "rules":
        return None
    kind, _, arg = spec.partition(":")
    if kind == "openai" and arg:
        if not arg.startswith(("http://", "https://")):
            raise BackendError(f"openai:{arg}: the base URL must start with http:// or https://")
        return OpenAIBackend(arg, timeout_s=timeout_s, retries=retries)
    if kind == "hf" and arg:
        return HFBackend(arg)
    raise BackendError(f"unknown backend {spec!r}: use rules, hf:PATH or openai:BASE_URL")
