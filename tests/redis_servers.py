"""Real Redis set-ups for the production-Redis tests, started by the tests themselves: a TLS server
with certificates made here, a master + replica + sentinel, a three-master cluster.

Each ``start_*`` raises ``Unavailable`` (with the server's own words) when this machine cannot run
that set-up, e.g. a redis-server built without TLS; the tests turn it into a skip with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.client import FINAL_STATUSES, Client, connect
from worker.embedded import find_redis_server, free_port
from worker.errors import RedisUnavailable
from worker.redis_conn import RedisOptions

if TYPE_CHECKING:
    from worker.agent import Worker
    from worker.settings import Settings

START_TIMEOUT_S = 15.0
CLUSTER_SLOTS = 16384


class Unavailable(Exception):
    """This machine cannot run the set-up; the message says why."""


def _client(**kwargs: Any) -> redis.Redis:
    """A probe that fails at once (no retries): readiness is polled here, with a deadline."""
    return redis.Redis(retry=Retry(NoBackoff(), 0), **kwargs)


def redis_binary() -> str:
    """PATH's redis-server first (a distribution's build has TLS and cluster-port), else the bundled one."""
    return shutil.which("redis-server") or find_redis_server()


def sentinel_command() -> list[str]:
    """How to start a sentinel: Debian's redis-sentinel, else any redis-server with --sentinel."""
    found = shutil.which("redis-sentinel")
    return [found] if found else [redis_binary(), "--sentinel"]


class Server:
    """One redis-server (or sentinel) process with a directory and a log of its own."""

    def __init__(self, args: Sequence[str], port: int, workdir: Path, name: str, *, config: str | None = None) -> None:
        self.port, self.name = port, name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "redis.log"
        common = ["--dir", str(self.dir), "--logfile", str(self.log), "--daemonize", "no", "--bind", "127.0.0.1"]
        if config is not None:  # a sentinel: its config file first (it rewrites it)
            path = self.dir / "sentinel.conf"
            path.write_text(config)
            binary, *mode = sentinel_command()
            self.args = [binary, str(path), *mode, *common, *args]
        else:
            self.args = [redis_binary(), *common, "--save", "", "--appendonly", "no", *args]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: redis.Redis | None = None) -> Server:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        client = ready or _client(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise Unavailable(f"{self.name} exited at start: {self.output()}")
                try:
                    client.ping()
                    return self
                except (redis.AuthenticationError, redis.ResponseError):
                    return self  # up, and asking for credentials
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                time.sleep(0.05)  # polling a child process's readiness
        finally:
            client.close()
        self.stop()
        raise Unavailable(f"{self.name} did not answer on port {self.port} within {START_TIMEOUT_S:.0f}s")

    def output(self) -> str:
        text = ""
        if self.process is not None and self.process.stderr is not None and self.process.poll() is not None:
            text = self.process.stderr.read().decode(errors="replace")
        if self.log.exists():
            text += self.log.read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        return " | ".join(lines[-4:])[-600:] or "(no output)"

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="emp-prod-redis-") as path:
        yield Path(path)


def stop_all(servers: Sequence[Server]) -> None:
    for server in servers:
        server.stop()


# --- TLS ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting it must fail verification


def make_certs(where: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an unrelated CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def ca(common: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(common)).issuer_name(name(common))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cert, key

    def leaf(common: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], server: bool) -> tuple[
            x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(common)).issuer_name(issuer[0].subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer[1], hashes.SHA256()), key

    authority = ca("emp-test-ca")
    server_cert, server_key = leaf("127.0.0.1", authority, server=True)
    client_cert, client_key = leaf("emp-worker", authority, server=False)
    other, _ = ca("emp-other-ca")
    return Certs(ca=write_cert(authority[0], where / "ca.pem"),
                 server_cert=write_cert(server_cert, where / "server.pem"),
                 server_key=write_key(server_key, where / "server.key"),
                 client_cert=write_cert(client_cert, where / "client.pem"),
                 client_key=write_key(client_key, where / "client.key"),
                 other_ca=write_cert(other, where / "other-ca.pem"))


def start_tls(where: Path, certs: Certs, acl: Sequence[str]) -> Server:
    """A redis-server speaking only TLS (client certificates required), with ACL users `acl`
    (``--user`` rules) and the default user off."""
    port = free_port()
    args = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs.server_cert),
            "--tls-key-file", str(certs.server_key), "--tls-ca-cert-file", str(certs.ca),
            "--tls-auth-clients", "yes", "--user", "default", "off"]
    for rule in acl:
        args += ["--user", *rule.split()]
    server = Server(args, port, where, "tls")
    ready = _client(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(certs.ca),
                        ssl_certfile=str(certs.client_cert), ssl_keyfile=str(certs.client_key), socket_timeout=1)
    return server.start(ready)


# --- Sentinel -------------------------------------------------------------------------------------


@dataclass
class SentinelSet:
    master: Server
    replica: Server
    sentinel: Server
    master_name: str
    password: str  # of the data nodes (requirepass / masterauth)
    sentinel_password: str

    def sentinel_client(self) -> redis.Redis:
        return _client(host="127.0.0.1", port=self.sentinel.port, password=self.sentinel_password,
                           socket_timeout=5, decode_responses=True)

    def node(self, port: int) -> redis.Redis:
        return _client(host="127.0.0.1", port=port, password=self.password, socket_timeout=5,
                           decode_responses=True)

    def master_port(self) -> int:
        with self.sentinel_client() as client:
            _host, port = _command(client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            return int(port)

    def servers(self) -> list[Server]:
        return [self.sentinel, self.replica, self.master]


def _command(client: redis.Redis, *args: object) -> Any:
    """One raw command (redis-py leaves execute_command untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _wait(condition: str, check: object, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if callable(check) and check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)  # polling servers that settle on their own
    raise Unavailable(f"{condition} not reached within {within_s:.0f}s ({last!r})")


def start_sentinel_set(where: Path, master_name: str = "empmaster", password: str = "node-secret",
                       sentinel_password: str = "sentinel-secret") -> SentinelSet:
    """A master, one replica and one sentinel (quorum 1) that knows both, all passworded."""
    master_port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    auth = ["--requirepass", password, "--masterauth", password, "--repl-diskless-sync-delay", "0"]
    master = Server(["--port", str(master_port), *auth], master_port, where, "master")
    replica = Server(["--port", str(replica_port), *auth, "--replicaof", "127.0.0.1", str(master_port)],
                     replica_port, where, "replica")
    config = (f"port {sentinel_port}\nsentinel monitor {master_name} 127.0.0.1 {master_port} 1\n"
              f"sentinel auth-pass {master_name} {password}\n"
              f"sentinel known-replica {master_name} 127.0.0.1 {replica_port}\n"
              f"sentinel down-after-milliseconds {master_name} 1000\n"
              f"sentinel failover-timeout {master_name} 10000\nrequirepass {sentinel_password}\n")
    sentinel = Server([], sentinel_port, where, "sentinel", config=config)
    started: list[Server] = []
    try:
        for server in (master, replica):
            started.append(server.start(_client(host="127.0.0.1", port=server.port, password=password,
                                                    socket_timeout=1)))
        started.append(sentinel.start(_client(host="127.0.0.1", port=sentinel_port, password=sentinel_password,
                                                  socket_timeout=1)))
        found = SentinelSet(master, replica, sentinel, master_name, password, sentinel_password)
        with found.node(replica_port) as node:
            _wait("the replica in sync", lambda: node.info("replication").get("master_link_status") == "up")
        with found.sentinel_client() as client:
            def knows_replica() -> bool:
                found = [dict(zip(r[::2], r[1::2], strict=True))
                         for r in _command(client, "SENTINEL", "REPLICAS", master_name)]
                return any(int(r["port"]) == replica_port and "s_down" not in r["flags"] for r in found)

            _wait("the sentinel knowing the replica", knows_replica)
        return found
    except BaseException:
        stop_all(started)
        raise


def failover(found: SentinelSet, within_s: float = 30.0) -> int:
    """SENTINEL FAILOVER, then wait until the old replica is the master the sentinel names; its port."""
    before = found.master_port()
    with found.sentinel_client() as client:
        _command(client, "SENTINEL", "FAILOVER", found.master_name)

    def moved() -> bool:
        """Done: the sentinel's master record (what redis-py reads) names the new master, which
        is one, and the old master is a replica now."""
        port = found.master_port()
        with found.sentinel_client() as client:
            masters = _command(client, "SENTINEL", "MASTERS")
        records = [dict(zip(m[::2], m[1::2], strict=True)) for m in masters]
        if port == before or not any(int(r["port"]) == port for r in records):
            return False
        with found.node(port) as node, found.node(before) as old:
            return bool(node.info("replication").get("role") == "master"
                        and old.info("replication").get("role") == "slave")

    _wait("the failover", moved, within_s)
    return found.master_port()


# --- Cluster --------------------------------------------------------------------------------------


def start_cluster(where: Path, masters: int = 3) -> list[Server]:
    """`masters` cluster nodes sharing the 16384 slots, each knowing the others, state ok."""
    ports = [free_port() for _ in range(masters)]
    buses = [free_port() for _ in range(masters)]  # --cluster-port: a port+10000 bus may not exist
    servers = [Server(["--port", str(p), "--cluster-enabled", "yes", "--cluster-port", str(b),
                       "--cluster-config-file", f"nodes-{p}.conf", "--cluster-node-timeout", "2000"],
                      p, where, f"node-{i}") for i, (p, b) in enumerate(zip(ports, buses, strict=True))]
    try:
        for server in servers:
            server.start()
        clients = [_client(host="127.0.0.1", port=p, socket_timeout=5, decode_responses=True) for p in ports]
        try:
            share = CLUSTER_SLOTS // masters
            for i, client in enumerate(clients):
                last = CLUSTER_SLOTS - 1 if i == masters - 1 else (i + 1) * share - 1
                _command(client, "CLUSTER", "ADDSLOTS", *range(i * share, last + 1))
            for client in clients[1:]:
                _command(client, "CLUSTER", "MEET", "127.0.0.1", ports[0], buses[0])

            def settled() -> bool:
                for client in clients:
                    info = _command(client, "CLUSTER", "INFO")
                    text = info if isinstance(info, str) else str(info)
                    covered = sum(int(e) - int(b) + 1 for b, e, *_ in _command(client, "CLUSTER", "SLOTS"))
                    if "cluster_state:ok" not in text or f"cluster_known_nodes:{masters}" not in text:
                        return False
                    if covered != CLUSTER_SLOTS:
                        return False
                return True

            _wait("the cluster state ok on every node", settled)
        finally:
            for client in clients:
                client.close()
        return servers
    except BaseException:
        stop_all(servers)
        raise


# --- a worker and a client on such a set-up -------------------------------------------------------


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, worker_id: str = "w1") -> AsyncIterator[Worker]:
    """An in-process Worker connected the way the daemon connects (the settings' Redis mode);
    drained and closed on exit."""
    from connectors.base import ConnectorConfig
    from connectors.manager import Plugins
    from tests.conftest import wait_until
    from worker.agent import Worker

    plugins = Plugins()
    instances = plugins.create_connectors(settings.connector_names, ConnectorConfig(worker_id, None))
    conn = connect(settings.redis_url, RedisOptions.from_settings(settings))
    worker = Worker(settings, conn, instances, worker_id=worker_id, plugins=plugins,
                    hardware={"gpu_memory_gb": 24, "gpu_model": "fake", "ram_gb": 64, "cpu_cores": 8})
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.state.value in ("idle", "busy") or task.done(), within_s=20)
        if task.done():
            task.result()  # its error, if it stopped
        yield worker
    finally:
        worker.request_stop()
        worker.fast_stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        await conn.aclose()


@contextlib.asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[Client]:
    async with Client.from_settings(settings) as client:
        yield client


async def wait_final(client: Client, job_ids: Sequence[str], within_s: float = 60.0) -> dict[str, dict[str, str]]:
    """Every job's hash once all of them are final (completed, failed or cancelled)."""
    from tests.conftest import wait_until

    jobs: dict[str, dict[str, str]] = {}

    async def all_final() -> bool:
        for job_id in job_ids:
            if jobs.get(job_id, {}).get("status") not in FINAL_STATUSES:
                with contextlib.suppress(redis.RedisError, OSError, RedisUnavailable):
                    jobs[job_id] = await client.get(job_id)
        return all(jobs.get(j, {}).get("status") in FINAL_STATUSES for j in job_ids)

    await wait_until(all_final, within_s=within_s, interval=0.05)
    return jobs
