"""One model backend: a server that speaks OpenAI's chat completions with server-sent events (another r1box, vLLM,
llama.cpp's llama-server, Ollama, SGLang), asked for one whole answer.

The answer streams in, so a backend that hangs is noticed by its silence rather than only at the end: before it
says anything it may think for first_token_timeout_s (an engine that is silent while it prefills a long prompt);
once it has said anything, even a keep-alive comment as r1box sends every 5 s while it prefills, the limit is
idle_timeout_s between two lines, so a slow but live r1box is never given up on before timeout_s (with one backend,
giving up would only start the answer over). The time to its first token is measured. Anything short of a whole answer (a refused connection, a 5xx,
a wrong key, another model than configured, a line that is not JSON, a stream that ends before its finish_reason)
is a BackendError naming the backend and what to check: the caller then asks the next backend for the whole
answer, so a user never gets half of one answer and half of another.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from appliance.config import BackendConfig
from appliance.errors import BackendError


@dataclass(frozen=True)
class Completion:
    content: str
    reasoning: str
    finish_reason: str
    backend: str  # the backend's label
    model: str  # the model name it answered with
    first_token_s: float
    total_s: float


class Backend:
    def __init__(self, config: BackendConfig, session: aiohttp.ClientSession):
        self.config, self.session, self.label = config, session, config.label
        self.base = config.url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {config.key}"} if config.key else {}
        self._ssl = None if config.verify_tls else False

    def _fail(self, what: str, timed_out: bool = False) -> BackendError:
        return BackendError(f"backend {self.label} ({self.base}): {what}", timed_out)

    async def models(self) -> list[str]:
        """The model names it serves (GET /v1/models): the health probe every engine answers, that also proves
        the key."""
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s + 2,
                                        sock_connect=self.config.connect_timeout_s)
        try:
            async with self.session.get(self.base + "/v1/models", headers=self._headers, timeout=timeout,
                                        ssl=self._ssl) as resp:
                await self._check_status(resp)
                body = await resp.json(content_type=None)
            return [m["id"] for m in body["data"]]
        except BackendError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise self._fail(f"unreachable ({type(e).__name__}: {e or 'timed out'})") from None
        except (ValueError, KeyError, TypeError):
            raise self._fail("/v1/models did not answer OpenAI's JSON; is this URL an OpenAI-compatible "
                             "server?") from None

    async def complete(self, messages: list[dict], max_tokens: int, temperature: float | None = None) -> Completion:
        started = time.monotonic()
        body = {"messages": messages, "stream": True, "max_tokens": max_tokens}
        if temperature is not None:  # else the backend's own default
            body["temperature"] = temperature
        if self.config.model:
            body["model"] = self.config.model
        # the headers may wait as long as the first token; then _read_stream times each line
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s, sock_connect=self.config.connect_timeout_s,
                                        sock_read=self.config.first_token_timeout_s)
        try:
            async with self.session.post(self.base + "/v1/chat/completions", json=body, headers=self._headers,
                                         timeout=timeout, ssl=self._ssl) as resp:
                await self._check_status(resp)
                return await self._read_stream(resp, started)
        except BackendError:
            raise
        except asyncio.TimeoutError:
            c = self.config
            raise self._fail(f"no answer within its timeouts (silent {c.idle_timeout_s:g} s once begun, first "
                             f"token {c.first_token_timeout_s:g} s, whole {c.timeout_s:g} s); is it overloaded or "
                             "hung?", timed_out=True) from None
        except aiohttp.ClientPayloadError:
            raise self._fail("the stream broke off before the answer ended; the backend may have crashed") from None
        except (aiohttp.ClientError, OSError) as e:
            raise self._fail(f"connection failed or broke ({type(e).__name__}: {e})") from None

    async def _check_status(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status == 200:
            return
        text = (await resp.text(errors="replace"))[:200]
        if resp.status in (401, 403):
            where = f"${self.config.key_env}" if self.config.key_env else "the variable named by key_env"
            raise self._fail(f"refused our key ({resp.status}); put a key it accepts in {where}")
        if resp.status == 404:
            raise self._fail(f"404 for an OpenAI path; check the url (base URL, without /v1) and the model name "
                             f"({text})")
        raise self._fail(f"answered {resp.status} ({text})")

    async def _read_stream(self, resp: aiohttp.ClientResponse, started: float) -> Completion:
        content, reasoning, finish, model, first = [], [], None, "", None
        heard = False  # any line yet, keep-alive comments included: from then on, silence means a hang
        while True:
            limits = [self.config.timeout_s - (time.monotonic() - started)]
            if heard:
                limits.append(self.config.idle_timeout_s)
            else:  # an engine that says nothing while it prefills
                limits.append(self.config.first_token_timeout_s - (time.monotonic() - started))
            raw = await asyncio.wait_for(resp.content.readline(), max(min(limits), 0.0))
            if not raw:
                break
            heard = True
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue  # blank separators, comments (keep-alives), event: names
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise self._fail(f"sent a line that is not JSON ({data[:80]!r})") from None
            if "error" in chunk:
                raise self._fail(f"reported an error mid-answer ({str(chunk['error'])[:200]})")
            model = chunk.get("model") or model
            if self.config.model and model and model != self.config.model:
                raise self._fail(f"answers with model {model!r}, not the configured {self.config.model!r}; fix "
                                 "[[backends]] model or the backend")
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                # DeepSeek's name for the reasoning; newer vLLM and Ollama call it `reasoning`
                thought = delta.get("reasoning_content") or delta.get("reasoning") or ""
                if delta.get("content") or thought:
                    first = first or time.monotonic()
                content.append(delta.get("content") or "")
                reasoning.append(thought)
                finish = choice.get("finish_reason") or finish
        if finish is None:
            raise self._fail("the stream ended before the answer did (no finish_reason); the backend may have "
                             "crashed")
        now = time.monotonic()
        return Completion("".join(content), "".join(reasoning), finish, self.label, model,
                          (first or now) - started, now - started)
