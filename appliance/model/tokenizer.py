"""Tokenizer and chat template of an artifact, as its manifest names them.

The chat template is the model's own Jinja template, rendered the way transformers renders it. DeepSeek-R1 prompts
end with an opened think block ("<think>\n"), as DeepSeek recommends; the model then writes only "</think>".
"""

from __future__ import annotations

from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from appliance.errors import ArtifactError
from appliance.model.manifest import Manifest


def _raise(message: str):
    raise TemplateError(message)


class ChatTokenizer:
    def __init__(self, manifest: Manifest):
        tok, chat = manifest.tokenizer, manifest.chat
        self.tokenizer = Tokenizer.from_file(str(manifest.directory / tok["file"]))
        self.bos_token, self.eos_token = tok.get("bos_token"), tok.get("eos_token")
        self.family = chat["family"]
        self.think = chat.get("think")
        self.stop_ids = frozenset(chat["stop_ids"])
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            self.template = env.from_string((manifest.directory / chat["template_file"]).read_text())
        except TemplateError as e:
            raise ArtifactError(f"{manifest.directory}: the chat template does not parse ({e}).") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        prompt = self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                      bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        if add_generation_prompt and self.think and self.think.get("opened_in_prompt"):
            opener = self.think["open"]
            if not prompt.rstrip().endswith(opener):
                prompt += opener + "\n"
        return prompt

    def encode(self, text: str) -> list[int]:
        # Templates write the BOS themselves, so the tokenizer must not add another.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self.tokenizer)


class StreamDecoder:
    """Turn token ids into text pieces as they arrive, holding back bytes of a character split across tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(ids) already handed out

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
