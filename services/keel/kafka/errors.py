"""librdkafka's security failures as Keel errors a person can act on, in one place.

On a secure broker two failures used to read as something else:

* a denied ACL: librdkafka answers ``*_AUTHORIZATION_FAILED`` (or, for a topic the
  principal may not describe, the topic is simply absent from a full metadata listing);
  it becomes ``AuthorizationDenied`` naming the principal, the resource and the operation;
* a wrong password: librdkafka reports ``_AUTHENTICATION`` only to the error callback and
  its log, and blocking calls wait out their whole timeout and then fail with a transport
  error; it becomes ``AuthenticationFailed`` naming the principal and the mechanism (never
  the password), raised as soon as the callback has seen it.

A ``KafkaWatch`` belongs to one client: ``watch.config(cfg)`` adds its error callback and
logger to the client's configuration, ``watch.check()`` raises the recorded authentication
failure, ``watch.translate(...)`` turns an authorization error into ``AuthorizationDenied``,
and ``watch.metadata(...)`` asks for metadata in short slices so a refused login ends the
wait at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException

from keel.errors import AuthenticationFailed, AuthorizationDenied

_LOG = logging.getLogger("keel.kafka.librdkafka")

# The resource kind each authorization error is about.
_AUTHORIZATION: dict[int, str] = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "topic",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "group",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "transactional id",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "cluster",
}
_AUTHENTICATION = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})
_SLICE_S = 0.5  # how long one metadata request may wait before the error callback is served


class _MetadataClient(Protocol):
    """What ``metadata`` needs of a Producer, Consumer or AdminClient."""

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...

    def poll(self, timeout: float = -1) -> Any: ...


def is_authorization_error(error: KafkaError) -> bool:
    """Whether ``error`` is an ACL denial."""
    return error.code() in _AUTHORIZATION


class KafkaWatch:
    """What librdkafka reports off the call path for one client, and its errors as ``KeelError``s."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        username = config.get("sasl.username")
        # a client configured without SASL is ANONYMOUS to the broker; a watch given no configuration knows no name
        self.principal = f"User:{username}" if username else "User:ANONYMOUS" if config else "this client's principal"
        self.mechanism: str | None = config.get("sasl.mechanism") if username else None
        self.bootstrap = str(config.get("bootstrap.servers", "the broker"))
        self._authentication: KafkaError | None = None

    def config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """``config`` with this watch's error callback and logger."""
        return {**config, "error_cb": self.on_error, "logger": self}

    def on_error(self, error: KafkaError) -> None:
        """librdkafka's error callback: remember the first authentication failure."""
        if error.code() in _AUTHENTICATION and self._authentication is None:
            self._authentication = error

    def log(self, level: int, fmt: str, *args: object) -> None:
        """librdkafka's log lines, to Python logging; a refused login is reported by ``check`` instead."""
        message = fmt % args if args else fmt
        if "SASL authentication" in message or "Authentication failed" in message:
            return
        _LOG.log(level, message)

    @property
    def authentication_failed(self) -> bool:
        return self._authentication is not None

    def check(self) -> None:
        """Raise ``AuthenticationFailed`` if the broker refused this client's credentials."""
        if self._authentication is not None:
            raise self.authentication_error()

    def authentication_error(self) -> AuthenticationFailed:
        how = f"SASL {self.mechanism}" if self.mechanism else "no SASL credentials"
        return AuthenticationFailed(
            f"{self.bootstrap} refused the credentials of {self.principal} ({how}); "
            "check KEEL_KAFKA_SASL_USERNAME and KEEL_KAFKA_SASL_PASSWORD",
            principal=self.principal, mechanism=self.mechanism)

    def translate(self, error: KafkaError | KafkaException, *, resource: str | None = None,
                  operation: str | None = None) -> AuthorizationDenied | AuthenticationFailed | None:
        """The Keel error for an authorization or authentication failure; None for any other error.

        ``resource`` names the topic, group or transactional id the call was about; for a
        group or transactional-id error on a topic call, the kind in the error wins.
        """
        if isinstance(error, KafkaException):
            if not error.args or not isinstance(error.args[0], KafkaError):
                return None
            error = error.args[0]
        code = error.code()
        if code in _AUTHENTICATION:
            self.on_error(error)
            return self.authentication_error()
        kind = _AUTHORIZATION.get(code)
        if kind is None:
            return None
        what = kind if kind == "cluster" else f"{kind} {resource}" if resource else f"a {kind}"
        doing = f"{operation} on " if operation else "access to "
        return AuthorizationDenied(
            f"the broker's ACLs deny {self.principal} {doing}{what} ({error.str()})",
            principal=self.principal, resource=f"{kind}:{resource}" if resource else kind, operation=operation)

    def metadata(self, client: _MetadataClient, topic: str | None, timeout_s: float) -> Any:
        """``client.list_topics(topic)``, raising ``AuthenticationFailed`` as soon as a login is refused.

        On a Consumer call it before assigning partitions: serving the error callback polls it.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                return client.list_topics(topic, timeout=max(0.001, min(_SLICE_S, remaining)))
            except KafkaException as exc:
                client.poll(0.05)  # serves the error callback; never a busy loop
                self.check()
                if time.monotonic() >= deadline:
                    typed = self.translate(exc)
                    if typed is not None:
                        raise typed from exc
                    raise

    def denied_topic(self, metadata: Any, topic: str, operation: str = "DESCRIBE") -> AuthorizationDenied | None:
        """The denial a topic's metadata carries, if any (``list_topics(topic)`` reports it per topic)."""
        error = metadata.error if metadata is not None else None
        if error is None or not is_authorization_error(error):
            return None
        denied = self.translate(error, resource=topic, operation=operation)
        assert isinstance(denied, AuthorizationDenied)
        return denied


def topic_partitions(client: _MetadataClient, config: Mapping[str, Any], topic: str, timeout_s: float) -> list[int]:
    """``topic``'s partitions, ``[]`` when it does not exist; ``AuthorizationDenied`` when the
    broker's ACLs hide it from ``config``'s principal (a listing of all topics just omits it)."""
    metadata = client.list_topics(topic, timeout=timeout_s).topics.get(topic)
    denied = KafkaWatch(config).denied_topic(metadata, topic)
    if denied is not None:
        raise denied
    if metadata is None or metadata.error is not None:
        return []
    return sorted(metadata.partitions)
