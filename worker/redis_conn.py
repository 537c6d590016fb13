"""Opening the Redis connection: one server (plain or TLS), a Sentinel-managed master, or a Cluster.

Every mode hands back an object the rest of the worker uses as a ``redis.asyncio.Redis``:

* **one server**: ``redis://`` or ``rediss://`` (TLS: the CA and client certificate from
  ``EMP_REDIS_CA_CERT`` / ``EMP_REDIS_CLIENT_CERT`` / ``EMP_REDIS_CLIENT_KEY``; the server's
  certificate and host name are verified unless ``EMP_REDIS_TLS_VERIFY=false``). An ACL user and
  password go in the URL, which is only ever shown through ``settings.redact_url``;
* **Sentinel** (``EMP_REDIS_SENTINELS`` + ``EMP_REDIS_MASTER_NAME``): every new connection asks the
  sentinels where the master is, so after a failover the worker's loops, which reconnect on
  RedisUnavailable, find the new master; a connection left on a demoted master gets READONLY,
  which redis-py turns into a ConnectionError. The URL still gives the scheme (TLS or not), the
  user, the password and the database; its host is not used;
* **Cluster** (``EMP_REDIS_CLUSTER=true``): redis-py's cluster client, seeded from the URL's host.
  Every key shares the hash tag of ``EMP_KEY_PREFIX`` (settings refuses a prefix without one), and
  each script names the tagged prefix as its one key (``Keys.routing_keys``), so it runs on the
  node of that slot. The cluster client has no ``publish``/``pubsub``: ``ClusterRedis`` adds them.
  Classic pub/sub is cluster-wide, so one plain connection to the tag's node serves both.

Redis's own errors reach the worker through worker/queue.py, which translates them.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from worker.errors import ConfigError, refused_credentials
from worker.settings import parse_sentinels, redact_url

if TYPE_CHECKING:
    from worker.settings import Settings

SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
SENTINEL_TIMEOUT_S = 2.0  # a sentinel that does not answer is skipped for the next one


@dataclass(frozen=True)
class RedisOptions:
    """How to reach Redis beyond what the URL says (built from Settings by ``from_settings``)."""

    ca_cert: str = ""
    client_cert: str = ""
    client_key: str = ""
    tls_verify: bool = True
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    sentinel_username: str = ""
    sentinel_password: str = field(default="", repr=False)
    cluster: bool = False
    home_key: str = ""  # cluster: a key in the slot that holds every key (the hash-tagged prefix)

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisOptions:
        return cls(
            ca_cert=settings.redis_ca_cert, client_cert=settings.redis_client_cert,
            client_key=settings.redis_client_key, tls_verify=settings.redis_tls_verify,
            sentinels=tuple(parse_sentinels(settings.redis_sentinels)), master_name=settings.redis_master_name,
            sentinel_username=settings.redis_sentinel_username,
            sentinel_password=settings.redis_sentinel_password.get_secret_value(),
            cluster=settings.redis_cluster, home_key=settings.key_prefix,
        )


def _tls_kwargs(options: RedisOptions) -> dict[str, Any]:
    return {
        "ssl_ca_certs": options.ca_cert or None, "ssl_certfile": options.client_cert or None,
        "ssl_keyfile": options.client_key or None, "ssl_cert_reqs": "required" if options.tls_verify else "none",
        "ssl_check_hostname": options.tls_verify,
    }


def _common_kwargs() -> dict[str, Any]:
    """Bounded timeouts (no call waits forever). Whatever others wrote may not be text: bytes
    that are not UTF-8 come back as surrogate escapes (which write back as the same bytes) instead
    of raising in the middle of a reply; worker.protocol.is_text tells them."""
    return {"decode_responses": True, "encoding_errors": "surrogateescape", "socket_timeout": SOCKET_TIMEOUT_S,
            "socket_connect_timeout": CONNECT_TIMEOUT_S, "health_check_interval": 0}


def open_redis(url: str, options: RedisOptions | None = None) -> aioredis.Redis:
    """The worker's Redis client for `url` in the mode `options` says (one server by default)."""
    options = options or RedisOptions()
    tls = urlsplit(url).scheme == "rediss"
    if options.sentinels:
        return _sentinel_master(url, options, tls)
    if options.cluster:
        # the cluster client answers every command the worker uses (ClusterRedis adds pub/sub);
        # it is no Redis subclass, so its type is stated here once
        return cast("aioredis.Redis", ClusterRedis(url, options))
    return aioredis.Redis.from_url(url, **_common_kwargs(), **(_tls_kwargs(options) if tls else {}))


# --- Sentinel ----------------------------------------------------------------------------------------


class SentinelRedis(aioredis.Redis):
    """A master found through sentinels; closing it closes the sentinel connections too."""

    sentinels: Sentinel | None = None

    def pubsub(self, **kwargs: Any) -> PubSub:
        return FollowingPubSub(self.connection_pool, **kwargs)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            for client in self.sentinels.sentinels:
                await client.aclose()


class FollowingPool(SentinelConnectionPool):
    """redis-py's sentinel pool asks the sentinels only when it opens a connection, so a pooled
    connection to a demoted master keeps serving (stale reads; writes until that node is
    reconfigured, which sentinels do in their own time). This one asks again at most every
    RECHECK_S when a command takes a connection; a new answer closes the idle connections, which
    reopen to the new master. A sentinel that does not answer leaves the current master in use."""

    RECHECK_S = 1.0  # at most one sentinel query a second per pool

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._checked = 0.0

    async def recheck(self) -> None:
        """Ask the sentinels where the master is, at most once per RECHECK_S."""
        now = time.monotonic()
        if self.is_master and now - self._checked >= self.RECHECK_S:
            self._checked = now
            with contextlib.suppress(MasterNotFoundError, RedisConnectionError, RedisTimeoutError, OSError):
                await self.get_master_address()  # type: ignore[no-untyped-call]

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        await self.recheck()
        return await super().get_connection()  # type: ignore[no-untyped-call]  # (its arguments are deprecated)


class FollowingPubSub(PubSub):
    """A subscription that leaves a master the sentinels no longer name: it waits at most
    RECHECK_S at a time and then raises ConnectionError, so the listener (worker/agent.py
    ``_listen``) resubscribes on the new master instead of hearing nothing until the old one is
    reconfigured. Waiting less than asked is allowed: get_message returns None then."""

    async def get_message(
        self, ignore_subscribe_messages: bool = False, timeout: float | None = 0.0  # noqa: ASYNC109 -- redis-py's
    ) -> Any:
        pool = self.connection_pool
        if isinstance(pool, FollowingPool) and self.connection is not None:
            await pool.recheck()
            where = (self.connection.host, self.connection.port)
            if pool.master_address is not None and where != tuple(pool.master_address):
                raise RedisConnectionError("the sentinels name another master now")
            timeout = pool.RECHECK_S if timeout is None else min(timeout, pool.RECHECK_S)
        return await super().get_message(ignore_subscribe_messages, timeout)


def _url_auth(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    database = parts.path.strip("/")
    return {"username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            "db": int(database) if database.isdigit() else 0}


def _sentinel_master(url: str, options: RedisOptions, tls: bool) -> aioredis.Redis:
    tls_kwargs = {"ssl": True, **_tls_kwargs(options)} if tls else {}
    # no retries: a sentinel that does not answer is left for the next one at once
    sentinel_kwargs = {"retry": Retry(NoBackoff(), 0),
                       "socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                       "username": options.sentinel_username or None,
                       "password": options.sentinel_password or None, **tls_kwargs}
    sentinels = Sentinel(list(options.sentinels), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client: SentinelRedis = sentinels.master_for(options.master_name, redis_class=SentinelRedis,
                                                 connection_pool_class=FollowingPool,
                                                 **_common_kwargs(), **_url_auth(url), **tls_kwargs)
    client.sentinels = sentinels
    return client


# --- Cluster -----------------------------------------------------------------------------------------


class ClusterRedis(RedisCluster):
    """redis-py's asyncio cluster client plus ``publish`` and ``pubsub``, both on the node that
    serves the hash tag's slot (classic pub/sub reaches subscribers on every node)."""

    def __init__(self, url: str, options: RedisOptions) -> None:
        tls = urlsplit(url).scheme == "rediss"
        tls_kwargs = _tls_kwargs(options) if tls else {}
        wanted = ("host", "port", "username", "password")
        seed: dict[str, Any] = {k: v for k, v in parse_url(url).items() if k in wanted}
        super().__init__(**seed, ssl=tls, **_common_kwargs(), **tls_kwargs)
        self.home_key = options.home_key
        self._seed: tuple[str, int] = (str(seed.get("host", "127.0.0.1")), int(seed.get("port", 6379)))
        self._node_kwargs: dict[str, Any] = {**_common_kwargs(), **_url_auth(url), **tls_kwargs, "ssl": tls}
        self._node_kwargs["db"] = 0
        self._node_clients: dict[str, aioredis.Redis] = {}

    def _home_node(self) -> ClusterNode | None:
        try:
            return self.get_node_from_key(self.home_key)
        except Exception:  # not initialized yet, or that slot has no node now: the seed will do
            return None

    def _node_client(self) -> aioredis.Redis:
        node = self._home_node()
        host, port = (node.host, int(node.port)) if node else self._seed
        name = f"{host}:{port}"
        client = self._node_clients.get(name)
        if client is None:
            client = self._node_clients[name] = aioredis.Redis(host=host, port=port, **self._node_kwargs)
        return client

    def pubsub(self, **kwargs: Any) -> PubSub:
        """A pub/sub on the tag's node (as of now: a later call follows the cluster's topology)."""
        return self._node_client().pubsub(**kwargs)

    async def publish(self, channel: str, message: str | bytes) -> int:
        await self.initialize()
        node = self._home_node()
        if node is None:
            return int(await self._node_client().publish(channel, message))
        return int(await self.execute_command("PUBLISH", channel, message, target_nodes=node))

    async def aclose(self, *args: Any, **kwargs: Any) -> None:
        await super().aclose(*args, **kwargs)
        clients, self._node_clients = list(self._node_clients.values()), {}
        for client in clients:
            await client.aclose()


# --- start-up ----------------------------------------------------------------------------------------


def describe(url: str, options: RedisOptions) -> str:
    """Where the worker connects, for logs (the password masked)."""
    if options.sentinels:
        parts = urlsplit(url)
        hosts = ",".join(f"{h}:{p}" for h, p in options.sentinels)
        user = f" as {parts.username}" if parts.username else ""
        return (f"master {options.master_name!r} of sentinels {hosts} ({parts.scheme}, db "
                f"{_url_auth(url)['db']}{user})")
    if options.cluster:
        return f"Redis Cluster seeded by {redact_url(url)} (hash tag of {options.home_key!r})"
    return redact_url(url)


_TLS_ADVICE: Mapping[str, str] = {
    "certificate verify failed": "EMP_REDIS_CA_CERT: the Redis server's TLS certificate was not verified ({why}); "
                                 "set EMP_REDIS_CA_CERT to the CA that signed it (and check the URL's host "
                                 "name is in it)",
    "certificate required": "EMP_REDIS_CLIENT_CERT: the Redis server asks for a client certificate ({why}); set "
                            "EMP_REDIS_CLIENT_CERT and EMP_REDIS_CLIENT_KEY",
    "unknown ca": "EMP_REDIS_CLIENT_CERT: the Redis server does not trust this client certificate ({why}); use "
                  "one signed by the CA it trusts",
    "wrong version number": "EMP_REDIS_URL: rediss:// but the server does not speak TLS on that port ({why}); use "
                            "redis:// or the server's TLS port",
    "record layer failure": "EMP_REDIS_URL: rediss:// but the server does not speak TLS on that port ({why}); "
                            "use redis:// or the server's TLS port",
}


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def refused(exc: BaseException) -> ConfigError | None:
    """A ConfigError when an error at start-up is configuration, not an outage: Redis refused our
    credentials or permissions, or TLS failed for a reason that retrying cannot fix."""
    credentials = refused_credentials(exc)
    if credentials is not None:
        return credentials
    found = _ssl_error(exc)
    if found is None:
        return None
    why = (getattr(found, "reason", None) or type(found).__name__).lower().replace("_", " ")
    for needle, advice in _TLS_ADVICE.items():
        if needle in why or needle in str(found).lower():
            return ConfigError(advice.format(why=why))
    return None
