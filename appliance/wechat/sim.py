"""The platform's side of a callback, for tests and for `r1box wechat-sim`: signed (and, in safe or compatible mode,
encrypted) requests exactly as the Official Account or WeCom servers send them, and the reply read back."""

from __future__ import annotations

import random
import string
import time
from dataclasses import dataclass
from urllib.parse import quote
from xml.etree import ElementTree

from wechatpy.crypto import PrpCrypto, WeChatCrypto
from wechatpy.enterprise.crypto import WeChatCrypto as WeComCrypto
from wechatpy.utils import to_text

from appliance.wechat.envelope import Account, sha1_signature


def text_message(to: str, user: str, content: str, msg_id: int, created: int | None = None) -> str:
    return (f"<xml><ToUserName><![CDATA[{to}]]></ToUserName><FromUserName><![CDATA[{user}]]></FromUserName>"
            f"<CreateTime>{created or int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[{content}]]></Content><MsgId>{msg_id}</MsgId></xml>")


def event_message(to: str, user: str, event: str, created: int | None = None, key: str = "") -> str:
    return (f"<xml><ToUserName><![CDATA[{to}]]></ToUserName><FromUserName><![CDATA[{user}]]></FromUserName>"
            f"<CreateTime>{created or int(time.time())}</CreateTime><MsgType><![CDATA[event]]></MsgType>"
            f"<Event><![CDATA[{event}]]></Event><EventKey><![CDATA[{key}]]></EventKey></xml>")


@dataclass
class Request:
    query: str  # the URL's query string, already encoded
    body: bytes


class Platform:
    """Signs and encrypts like the platform. mode: "plain", "compat" or "safe" (Official Account); WeCom is
    always encrypted."""

    def __init__(self, account: Account, mode: str = "plain"):
        self.account, self.mode = account, mode
        if account.kind == "wecom":
            self.mode = "safe"

    def _crypto(self):
        cls = WeComCrypto if self.account.kind == "wecom" else WeChatCrypto
        return cls(self.account.token, self.account.aes_key, self.account.app_id)

    def url_check(self, echostr: str = "", timestamp: int | None = None, nonce: str | None = None) -> str:
        timestamp, nonce = str(timestamp or int(time.time())), nonce or _nonce()
        if self.account.kind == "wecom":
            encrypted = to_text(PrpCrypto(self._crypto().key).encrypt(echostr, self.account.app_id))
            signature = sha1_signature(self.account.token, timestamp, nonce, encrypted)
            return (f"msg_signature={signature}&timestamp={timestamp}&nonce={nonce}"
                    f"&echostr={quote(encrypted, safe='')}")
        signature = sha1_signature(self.account.token, timestamp, nonce)
        return f"signature={signature}&timestamp={timestamp}&nonce={nonce}&echostr={quote(echostr, safe='')}"

    def message(self, xml: str, timestamp: int | None = None, nonce: str | None = None) -> Request:
        timestamp, nonce = str(timestamp or int(time.time())), nonce or _nonce()
        plain_sig = sha1_signature(self.account.token, timestamp, nonce)
        if self.mode == "plain":
            return Request(f"signature={plain_sig}&timestamp={timestamp}&nonce={nonce}&openid=sim",
                           xml.encode())
        envelope = self._crypto().encrypt_message(xml, nonce, timestamp)
        encrypt = _between(envelope, "<Encrypt><![CDATA[", "]]></Encrypt>")
        msg_sig = sha1_signature(self.account.token, timestamp, nonce, encrypt)
        inner = f"<Encrypt><![CDATA[{encrypt}]]></Encrypt>"
        body = (xml.replace("</xml>", inner + "</xml>") if self.mode == "compat"
                else f"<xml><ToUserName><![CDATA[{self.account.app_id}]]></ToUserName>{inner}</xml>")
        if self.account.kind == "wecom":
            return Request(f"msg_signature={msg_sig}&timestamp={timestamp}&nonce={nonce}", body.encode())
        return Request(f"signature={plain_sig}&timestamp={timestamp}&nonce={nonce}&openid=sim&encrypt_type=aes"
                       f"&msg_signature={msg_sig}", body.encode())

    def read_reply(self, text: str) -> str | None:
        """The reply's text content, decrypted when the mode is encrypted; None for success or an empty body."""
        if text in ("success", ""):
            return None
        if self.mode != "plain":  # the reply carries its own signature, timestamp and nonce
            text = self._crypto().decrypt_message(text, _between(text, "<MsgSignature><![CDATA[", "]]>"),
                                                  _between(text, "<TimeStamp>", "</TimeStamp>"),
                                                  _between(text, "<Nonce><![CDATA[", "]]></Nonce>"))
        return ElementTree.fromstring(text).findtext("Content")


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def _nonce() -> str:
    return "".join(random.choices(string.digits, k=10))
