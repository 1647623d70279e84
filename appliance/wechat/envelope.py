"""The callback envelope: signatures, freshness, decryption and the reply's XML, for the Official Account and WeCom.

wechatpy does the parsing and the AES; its gaps are closed here, once, before anything else sees a request:
signatures compared in constant time, a timestamp window and a nonce replay cache, XML with a DOCTYPE or entities
refused, `]]>` in reply text escaped, the previous EncodingAESKey tried when the current one fails (key rotation),
and every way a request can be malformed or forged turned into a BadCallback (a 4xx and a log line upstream).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass
from xml.parsers.expat import ExpatError

from wechatpy import parse_message
from wechatpy.crypto import WeChatCrypto
from wechatpy.enterprise.crypto import WeChatCrypto as WeComCrypto
from wechatpy.exceptions import InvalidSignatureException

from appliance.errors import R1boxError


class BadCallback(R1boxError):
    """A callback that is malformed, forged, stale or replayed: answered with its `status`, never processed."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Account:
    """One Official Account or WeCom app, as configured. The secrets come from the environment."""

    kind: str  # "mp" (Official Account) or "wecom"
    app_id: str  # AppID, or the CorpID for WeCom
    token: str
    aes_key: str = ""  # EncodingAESKey, 43 characters; empty: plain mode only
    previous_aes_key: str = ""  # accepted for decryption during a rotation
    agent_id: str = ""  # WeCom only
    mode: str = "compat"  # plain: refuse ciphertext; safe: refuse plaintext; compat: take either
    replay_window_s: int = 300


def sha1_signature(*parts: str) -> str:
    return hashlib.sha1("".join(sorted(parts)).encode()).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class ReplayGuard:
    """Refuses timestamps outside a window around now, and a (timestamp, nonce) pair that comes back with another
    signature. The platform's own retries repeat the whole query, signature included: those pass, and are
    duplicates for de-duplication to catch, not attacks."""

    def __init__(self, window_s: int = 300, capacity: int = 100_000):
        self.window_s, self.capacity = window_s, capacity
        self._seen: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()

    def check(self, timestamp: str, nonce: str, signature: str, now: float | None = None) -> None:
        if not self.window_s:  # 0 turns the window off, for a box whose clock cannot be trusted
            return
        now = time.time() if now is None else now
        try:
            ts = int(timestamp)
        except ValueError:
            raise BadCallback("timestamp is not an integer", 403) from None
        if abs(now - ts) > self.window_s:
            raise BadCallback(f"timestamp is {int(now - ts)} s off (window {self.window_s} s)", 403)
        while self._seen and (next(iter(self._seen.values()))[0] < now - self.window_s
                              or len(self._seen) >= self.capacity):
            self._seen.popitem(last=False)
        key = (timestamp, nonce)
        if key in self._seen and not same(self._seen[key][1], signature):
            raise BadCallback("nonce reused with another signature", 403)
        self._seen[key] = (now, signature)


def check_plain_signature(account: Account, query) -> tuple[str, str]:
    """The Official Account's URL signature over (token, timestamp, nonce); returns (timestamp, nonce)."""
    signature, timestamp, nonce = (query.get(k, "") for k in ("signature", "timestamp", "nonce"))
    if not (signature and timestamp and nonce):
        raise BadCallback("signature, timestamp and nonce are required", 403)
    if not same(sha1_signature(account.token, timestamp, nonce), signature):
        raise BadCallback("bad signature", 403)
    return timestamp, nonce


def safe_xml(body: bytes) -> str:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadCallback("body is not UTF-8") from None
    if "<!DOCTYPE" in text.upper() or "<!ENTITY" in text.upper():
        raise BadCallback("XML with a DOCTYPE or entities is refused")
    return text


def _cryptos(account: Account):
    cls = WeComCrypto if account.kind == "wecom" else WeChatCrypto
    return [cls(account.token, key, account.app_id) for key in (account.aes_key, account.previous_aes_key) if key]


def decrypt(account: Account, xml: str, msg_signature: str, timestamp: str, nonce: str) -> str:
    """The plaintext XML of an encrypted callback, trying the previous key after the current one."""
    if not account.aes_key:
        raise BadCallback("an encrypted callback arrived but no EncodingAESKey is configured", 403)
    if "<Encrypt>" not in xml:
        raise BadCallback("encrypted mode without an <Encrypt> element")
    failures = []
    for crypto in _cryptos(account):
        try:
            return crypto.decrypt_message(xml, msg_signature, timestamp, nonce)
        except InvalidSignatureException:
            raise BadCallback("bad msg_signature", 403) from None
        except Exception as e:  # the other key's garbage, or tampering: struct.error, UnicodeDecodeError, …
            failures.append(type(e).__name__)
    if "InvalidAppIdException" in failures:  # it decrypted, but for someone else
        raise BadCallback("the message is for another AppID/CorpID", 403)
    raise BadCallback(f"cannot decrypt ({', '.join(failures)})")


def decrypt_echostr(account: Account, msg_signature: str, timestamp: str, nonce: str, echostr: str) -> str:
    """WeCom's URL verification: the echostr arrives encrypted and must be answered in plaintext."""
    for crypto in _cryptos(account):
        try:
            return crypto.check_signature(msg_signature, timestamp, nonce, echostr)
        except InvalidSignatureException:
            raise BadCallback("bad msg_signature", 403) from None
        except Exception:  # garbage ciphertext: try the previous key, then give up
            continue
    raise BadCallback("cannot decrypt echostr", 400)


def parse(xml: str):
    try:
        message = parse_message(xml)
    except (ExpatError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadCallback(f"malformed message XML ({type(e).__name__})") from None
    if message is None:
        raise BadCallback("empty message")
    return message


def reply_xml(message, text: str) -> str:
    """A passive text reply. CDATA cannot hold `]]>`: it is split across two CDATA sections."""
    safe = text.replace("]]>", "]]]]><![CDATA[>")
    now = int(time.time())
    return (f"<xml><ToUserName><![CDATA[{message.source}]]></ToUserName>"
            f"<FromUserName><![CDATA[{message.target}]]></FromUserName><CreateTime>{now}</CreateTime>"
            f"<MsgType><![CDATA[text]]></MsgType><Content><![CDATA[{safe}]]></Content></xml>")


def encrypt_reply(account: Account, xml: str, nonce: str, timestamp: str) -> str:
    return _cryptos(account)[0].encrypt_message(xml, nonce, timestamp)


def split_utf8(text: str, limit: int = 2048) -> list[str]:
    """Pieces of at most `limit` UTF-8 bytes, never cutting a character (WeChat counts bytes, not characters)."""
    pieces, current, size = [], [], 0
    for ch in text:
        n = len(ch.encode())
        if size + n > limit:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(ch)
        size += n
    if current or not pieces:
        pieces.append("".join(current))
    return pieces
