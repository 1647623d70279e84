"""Conversations in, text out: the chat template, the engine, detokenization and the reasoning split, in one place.

The local API, `r1box chat` and the WeChat dialog all talk to the model through this, so they render, stop and
separate reasoning the same way.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from appliance.errors import EngineBusy, RequestError
from appliance.model.engine import Engine, Finish
from appliance.model.manifest import Manifest
from appliance.model.reasoning import ReasoningSplitter
from appliance.model.sampling import R1_DEFAULTS, SamplingParams
from appliance.model.tokenizer import ChatTokenizer
from appliance.ops.metrics import Metrics, StreamTimer

ROLES = ("system", "user", "assistant")


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""


class ChatService:
    def __init__(self, manifest: Manifest, tokenizer: ChatTokenizer, engine: Engine, metrics: Metrics | None = None):
        self.manifest, self.tokenizer, self.engine = manifest, tokenizer, engine
        self.metrics = metrics or Metrics()
        self.model_name = manifest.name
        self.started = time.time()
        think = manifest.chat.get("think")
        self.think = think
        # the model family's recommended sampling; a request overrides any of it
        self.defaults = dict(R1_DEFAULTS) if manifest.chat["family"] == "deepseek-r1" else {}

    def params(self, **given) -> SamplingParams:
        values = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        try:
            return SamplingParams(**values)
        except ValueError as e:
            raise RequestError(str(e)) from None

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        for m in messages:
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise RequestError("each message needs a role (system, user or assistant) and text content.")
        if not messages or messages[-1]["role"] != "user":
            raise RequestError("the conversation must end with a user message.")
        return self.tokenizer.encode(self.tokenizer.render(messages))

    async def reply(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[Delta | Finish]:
        """Stream the answer as Deltas (reasoning apart from content), then the Finish."""
        timer, status = StreamTimer(self.metrics), "cancelled"
        try:
            ids = self.prompt_ids(messages)
            stream = self.tokenizer.stream()
            think = self.think or {}
            splitter = ReasoningSplitter(think.get("open", "<think>"), think.get("close", "</think>"),
                                         opened_in_prompt=bool(think.get("opened_in_prompt")))
            async for item in self.engine.generate(ids, params):
                if isinstance(item, Finish):
                    status = item.reason
                    rest = splitter.finish()
                    if rest.reasoning or rest.content:
                        yield Delta(rest.reasoning, rest.content)
                    yield item
                    return
                timer.token()
                if item in self.tokenizer.stop_ids:
                    continue
                part = splitter.push(stream.push(item))
                if part.reasoning or part.content:
                    yield Delta(part.reasoning, part.content)
        except EngineBusy:
            status = "busy"
            self.metrics.errors.labels("busy").inc()
            raise
        except RequestError:
            status = "bad_request"
            self.metrics.errors.labels("bad_request").inc()
            raise
        except Exception:
            status = "error"
            self.metrics.errors.labels("internal").inc()
            raise
        finally:
            timer.done(status)
