"""Apache Kafka for the reliability suite: jars from Maven Central (cached), KRaft brokers on 127.0.0.1.

`kafka_classpath()` resolves org.apache.kafka:kafka_2.13 and its dependencies with the machine's
Maven into ~/.cache/runwatch/kafka-<version>/ once; later runs reuse it. `KafkaCluster(n)` formats
and starts n combined broker+controller nodes (n=3: replication factor 3, min.insync.replicas 2),
waits until every broker is registered, and can SIGKILL, restart, SIGSTOP and SIGCONT each node.

With RUNWATCH_TEST_BOOTSTRAP=host:port[,...] the suite uses that cluster instead (`cluster()` returns an
`ExternalCluster`): the tests that need no control of the brokers' processes run against it; the ones
marked `own_brokers` (kill, pause, a proxy in front, a SCRAM listener) are deselected, and said so.
With RUNWATCH_TEST_DOCKER=1 that cluster is one Kafka container started with testcontainers for the
session (a Docker engine must be reachable; these build machines have none, so that path is not run here).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from runwatch.core.net import free_port, port_open

ROOT = Path(__file__).resolve().parent.parent
KAFKA_VERSION = os.environ.get("RUNWATCH_TEST_KAFKA_VERSION", "4.1.1")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "runwatch" / f"kafka-{KAFKA_VERSION}"

LOG4J = """rootLogger.level=WARN
rootLogger.appenderRef.stdout.ref=STDOUT
appender.stdout.type=Console
appender.stdout.name=STDOUT
appender.stdout.layout.type=PatternLayout
appender.stdout.layout.pattern=[%d] %p %m (%c)%n
"""


def kafka_classpath() -> str:
    """The broker's classpath; the first call on a machine downloads the jars (about 40 MB) with Maven."""
    lib = CACHE / "lib"
    done = CACHE / ".complete"
    if not done.exists():
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError("Maven (mvn) is needed to fetch Apache Kafka's jars for the reliability suite")
        shutil.rmtree(lib, ignore_errors=True)
        lib.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([mvn, "-q", "-B", "-f", str(ROOT / "tests" / "kafka" / "pom.xml"),
                              f"-Dkafka.version={KAFKA_VERSION}", "dependency:copy-dependencies",
                              f"-DoutputDirectory={lib}", "-DincludeScope=runtime"],
                             capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"Maven could not fetch kafka_2.13 {KAFKA_VERSION}:\n{out.stdout[-3000:]}")
        (CACHE / "log4j2.properties").write_text(LOG4J)
        done.write_text(KAFKA_VERSION)
    return str(lib / "*")


def _pem_line(path: Path) -> str:
    """A PEM file as one properties value (newlines escaped)."""
    return path.read_text().strip().replace("\n", "\\n")


class KafkaCluster:
    def __init__(self, n: int, workdir: Path, heap_mb: int = 384, scram: tuple[str, str] | None = None):
        """`scram`: (user, password) adds a SASL_SSL listener (SCRAM-SHA-512 over TLS; certificates made
        here with openssl) beside the PLAINTEXT one; `secure_bootstrap` names it."""
        self.n = n
        self.scram = scram
        self.secure_ports = [free_port() for _ in range(n)] if scram else []
        self.workdir = Path(workdir)
        self.heap_mb = heap_mb
        self.ports = [free_port() for _ in range(n)]
        self.controller_ports = [free_port() for _ in range(n)]
        #: what clients are told to connect to (a test proxy may stand in front of a broker)
        self.advertised = list(self.ports)
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.cluster_id = None

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.advertised)

    @property
    def secure_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.secure_ports)

    def make_certificates(self) -> Path:
        """A CA and a broker certificate for 127.0.0.1 (PEM); returns the directory (ca.pem inside)."""
        d = self.workdir / "tls"
        d.mkdir(parents=True, exist_ok=True)
        run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)  # noqa: E731
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=runwatch-test-ca")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr", "-subj",
            "/CN=127.0.0.1")
        (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "broker.pem", "-days", "2", "-extfile", "ext.cnf")
        run("pkcs8", "-topk8", "-nocrypt", "-in", "broker.key", "-out", "broker.pk8")
        return d
    def _props(self, i: int) -> Path:
        voters = ",".join(f"{j + 1}@127.0.0.1:{p}" for j, p in enumerate(self.controller_ports))
        rf = min(3, self.n)
        props = {
            "process.roles": "broker,controller", "node.id": i + 1, "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.ports[i]},CONTROLLER://127.0.0.1:{self.controller_ports[i]}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.advertised[i]}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT", "log.dirs": self.workdir / f"node{i + 1}" / "data",
            "offsets.topic.replication.factor": rf, "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": min(2, rf), "default.replication.factor": rf,
            "min.insync.replicas": min(2, rf), "group.initial.rebalance.delay.ms": 0,
            "auto.create.topics.enable": "false", "log.flush.interval.messages": 1,
        }
        if self.scram:
            tls = self.workdir / "tls"
            props["listeners"] += f",SASL_SSL://127.0.0.1:{self.secure_ports[i]}"
            props["advertised.listeners"] += f",SASL_SSL://127.0.0.1:{self.secure_ports[i]}"
            props["listener.security.protocol.map"] += ",SASL_SSL:SASL_SSL"
            props.update({
                "sasl.enabled.mechanisms": "SCRAM-SHA-512", "ssl.keystore.type": "PEM",
                "ssl.keystore.certificate.chain": _pem_line(tls / "broker.pem"),
                "ssl.keystore.key": _pem_line(tls / "broker.pk8"),
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"})
        path = self.workdir / f"node{i + 1}" / "server.properties"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def _java(self, *args: str) -> list[str]:
        return ["java", f"-Xmx{self.heap_mb}m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                f"-Dlog4j2.configurationFile={CACHE / 'log4j2.properties'}", "-cp", kafka_classpath(), *args]

    def start(self, timeout: float = 90) -> "KafkaCluster":
        self.cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()[:22]
        if self.scram:
            self.make_certificates()
        for i in range(self.n):
            props = self._props(i)
            scram = ["--add-scram", f"SCRAM-SHA-512=[name={self.scram[0]},password={self.scram[1]}]"] if self.scram else []
            out = subprocess.run(self._java("kafka.tools.StorageTool", "format", f"--cluster-id={self.cluster_id}",
                                            "-c", str(props), *scram), capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise RuntimeError(f"formatting node {i + 1} failed: {out.stdout}{out.stderr}")
        for i in range(self.n):
            self.start_node(i, wait=False)
        self.wait_ready(timeout)
        return self

    def start_node(self, i: int, wait: bool = True) -> None:
        props = self.workdir / f"node{i + 1}" / "server.properties"
        log = open(self.workdir / f"node{i + 1}" / "broker.log", "ab")
        self.procs[i] = subprocess.Popen(self._java("kafka.Kafka", str(props)), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 90) -> float:
        """Block until every running node answers and all of them are registered brokers; return seconds."""
        t0 = time.monotonic()
        alive = [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]
        while time.monotonic() - t0 < timeout:
            for i, p in enumerate(self.procs):
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"Kafka node {i + 1} exited: "
                                       f"{(self.workdir / f'node{i + 1}' / 'broker.log').read_text()[-3000:]}")
            if all(port_open(self.ports[i]) for i in alive) and self._brokers() >= len(alive):
                return time.monotonic() - t0
            time.sleep(0.2)
        raise TimeoutError(f"Kafka cluster not ready after {timeout}s")

    def _brokers(self) -> int:
        async def count() -> int:
            from aiokafka.admin import AIOKafkaAdminClient

            live = ",".join(f"127.0.0.1:{self.ports[i]}" for i, p in enumerate(self.procs)
                            if p is not None and p.poll() is None)
            admin = AIOKafkaAdminClient(bootstrap_servers=live, request_timeout_ms=3000)
            try:
                await admin.start()
                info = await admin.describe_cluster()
                return len(info["brokers"])
            except Exception:
                return 0
            finally:
                await admin.close()
        return asyncio.run(count())

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)

    def pause(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGCONT)

    def leader_of(self, topic: str, partition: int = 0) -> int:
        """Index of the node leading a partition."""
        async def find() -> int:
            from aiokafka.admin import AIOKafkaAdminClient

            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
            await admin.start()
            try:
                (info,) = await admin.describe_topics([topic])
            finally:
                await admin.close()
            return next(int(p["leader"]) for p in info["partitions"] if p["partition"] == partition) - 1
        return asyncio.run(find())

    def stop(self) -> None:
        for i, p in enumerate(self.procs):
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGCONT)
            p.terminate()
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


EXTERNAL = os.environ.get("RUNWATCH_TEST_BOOTSTRAP", "")
DOCKER_IMAGE = os.environ.get("RUNWATCH_TEST_DOCKER_IMAGE", "confluentinc/cp-kafka:7.6.0")
_container = None


def docker_bootstrap() -> str:
    """One KRaft Kafka container for the whole session (testcontainers removes it when the session ends)."""
    global _container
    if _container is None:
        try:
            from testcontainers.community.kafka import KafkaContainer

            _container = KafkaContainer(DOCKER_IMAGE).with_kraft()
            _container.start()
        except Exception as exc:
            raise RuntimeError(f"RUNWATCH_TEST_DOCKER=1: no Kafka container could be started ({exc}); a Docker engine "
                               "must be reachable (DOCKER_HOST), or unset RUNWATCH_TEST_DOCKER to start brokers "
                               "from the Maven jars") from exc
    return _container.get_bootstrap_server()


def uses_external_cluster() -> bool:
    return bool(EXTERNAL or os.environ.get("RUNWATCH_TEST_DOCKER"))


class ExternalCluster:
    """A Kafka cluster the suite did not start (RUNWATCH_TEST_BOOTSTRAP): started and stopped by its owner.
    Every test uses its own topic prefix, so tests leave each other's topics alone on a shared cluster."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.n = 0

    def start(self, timeout: float = 30) -> "ExternalCluster":
        async def brokers() -> int:
            from aiokafka.admin import AIOKafkaAdminClient

            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
            try:
                await admin.start()
                return len((await admin.describe_cluster())["brokers"])
            finally:
                await admin.close()

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.n = asyncio.run(brokers())
                return self
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"RUNWATCH_TEST_BOOTSTRAP={self.bootstrap}: no Kafka cluster answers ({exc})")
                time.sleep(1)

    def stop(self) -> None:
        pass


def cluster(n: int, workdir: Path, **kwargs) -> "KafkaCluster | ExternalCluster":
    """n local brokers (not started), or the external cluster when RUNWATCH_TEST_BOOTSTRAP names one
    (or RUNWATCH_TEST_DOCKER asks for a container)."""
    if EXTERNAL:
        return ExternalCluster(EXTERNAL).start()  # started already: its size is known at once
    if os.environ.get("RUNWATCH_TEST_DOCKER"):
        return ExternalCluster(docker_bootstrap()).start()
    return KafkaCluster(n, workdir, **kwargs)


if __name__ == "__main__":  # `./dev test` fetches the jars before any test starts: `python tests/kafka_cluster.py --fetch`
    import sys

    if sys.argv[1:] != ["--fetch"]:
        raise SystemExit("usage: python tests/kafka_cluster.py --fetch")
    if not (CACHE / ".complete").exists():
        print(f"==> fetching Apache Kafka {KAFKA_VERSION}'s jars with Maven into {CACHE} (once per machine)", flush=True)
    kafka_classpath()
