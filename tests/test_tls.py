"""tls:// schedulers: certificates through distributed's Security, from the CLI or dask config.

A real `dask scheduler --protocol tls` and `dask worker` run with certificates made
here (a throw-away CA, one certificate for the cluster's nodes, one for the client);
clients without a certificate, or with one from another CA, are refused.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import pipeline as pl
from conftest import RealCluster, ROOT, _wait_for

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path, cert, key):
    with open(path + ".pem", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(path + ".key", "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return path + ".pem", path + ".key"


def make_ca(directory, cn):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    pem, _ = _write(os.path.join(directory, cn), cert, key)
    return cert, key, pem


def make_leaf(directory, cn, ca_cert, ca_key):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    return _write(os.path.join(directory, cn), cert, key)


class TLSCluster:
    """`dask scheduler --protocol tls` + one `dask worker`, with certificates made here."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="pipeline-tls-")
        ca_cert, ca_key, self.ca = make_ca(self.dir, "pipeline-test-ca")
        self.node_cert, self.node_key = make_leaf(self.dir, "node", ca_cert, ca_key)
        self.client_cert, self.client_key = make_leaf(self.dir, "client", ca_cert, ca_key)
        rogue_cert, rogue_key, self.rogue_ca = make_ca(self.dir, "rogue-ca")
        self.rogue_cert, self.rogue_key = make_leaf(self.dir, "rogue-client", rogue_cert, rogue_key)
        tls = ["--tls-ca-file", self.ca, "--tls-cert", self.node_cert, "--tls-key", self.node_key]
        dask = os.path.join(os.path.dirname(sys.executable), "dask")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        sched_file = os.path.join(self.dir, "scheduler.json")
        self.procs = []
        log = open(os.path.join(self.dir, "scheduler.log"), "w")
        self.procs.append(subprocess.Popen(
            [dask, "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", sched_file, *tls],
            stdout=log, stderr=subprocess.STDOUT, env=env))
        self.address = _wait_for(sched_file)["address"]
        assert self.address.startswith("tls://")
        wlog = open(os.path.join(self.dir, "worker.log"), "w")
        self.procs.append(subprocess.Popen(
            [dask, "worker", self.address, "--nthreads", "1", "--memory-limit", "2GiB",
             "--host", "127.0.0.1", "--no-dashboard", *tls],
            stdout=wlog, stderr=subprocess.STDOUT, env=env))
        self.security = pl_security(self.ca, self.client_cert, self.client_key)
        from distributed import Client

        with Client(self.address, security=self.security, timeout=30) as c:
            c.wait_for_workers(1, timeout=60)

    def cli_tls(self):
        return ["--tls-ca-file", self.ca, "--tls-cert", self.client_cert, "--tls-key", self.client_key]

    close = RealCluster.close  # same processes and directory to tidy


def pl_security(ca, cert, key):
    from distributed import Security

    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)


@pytest.fixture(scope="module")
def tls_cluster():
    c = TLSCluster()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    pl.make_cifar_like(str(d / "train.zarr"), 600, n_features=48, random_state=1, chunk_rows=150)
    pl.make_cifar_like(str(d / "test.zarr"), 80, n_features=48, random_state=2, chunk_rows=40)
    return d


def test_cli_knn_over_tls_with_certificates_matches_threads(tls_cluster, stores, capsys):
    from pipeline.cli import main

    args = ["knn", str(stores / "test.zarr"), str(stores / "train.zarr")]
    assert main(args + [str(stores / "threads.zarr"), "--no-progress", "--overwrite"]) == 0
    assert main(args + [str(stores / "tls.zarr"), "--no-progress", "--overwrite",
                        "--scheduler", tls_cluster.address, *tls_cluster.cli_tls()]) == 0
    import zarr

    ta, tb = zarr.open_group(str(stores / "threads.zarr")), zarr.open_group(str(stores / "tls.zarr"))
    np.testing.assert_array_equal(ta["indices"][:], tb["indices"][:])
    np.testing.assert_allclose(ta["distances"][:], tb["distances"][:], rtol=1e-12)
    np.testing.assert_array_equal(ta["predictions"][:], tb["predictions"][:])


def test_tls_from_dask_config(tls_cluster):
    import dask.config

    from pipeline import runtime

    cfg = {"distributed.comm.tls.ca-file": tls_cluster.ca,
           "distributed.comm.tls.client.cert": tls_cluster.client_cert,
           "distributed.comm.tls.client.key": tls_cluster.client_key}
    x = np.random.default_rng(0).standard_normal((50, 6))
    with dask.config.set(cfg), runtime.connect(tls_cluster.address, echo=lambda *_: None) as client:
        assert client.scheduler.address.startswith("tls://")
        d = pl.pairwise_distances(x, x[:20], memory_budget="64MiB")
        (got,) = runtime.compute(d)
    from scipy.spatial.distance import cdist

    # GEMM expansion vs direct differences: cancellation near the diagonal, ~1e-7 absolute.
    np.testing.assert_allclose(got, cdist(x, x[:20]), atol=1e-6)


def _run_cli(argv, timeout=60):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True, text=True,
                       timeout=timeout, env=env)
    return r, time.monotonic() - t0


def test_client_without_certificate_is_refused(tls_cluster, stores):
    r, _ = _run_cli(["distances", str(stores / "test.zarr"), str(stores / "train.zarr"),
                     str(stores / "nocert.zarr"), "--scheduler", tls_cluster.address])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tls-ca-file" in lines[0] and "--tls-cert" in lines[0], r.stderr
    assert not os.path.exists(stores / "nocert.zarr")


def test_client_with_certificate_of_another_ca_is_refused(tls_cluster, stores):
    r, took = _run_cli(["distances", str(stores / "test.zarr"), str(stores / "train.zarr"),
                        str(stores / "rogue.zarr"), "--scheduler", tls_cluster.address,
                        "--tls-ca-file", tls_cluster.rogue_ca, "--tls-cert", tls_cluster.rogue_cert,
                        "--tls-key", tls_cluster.rogue_key])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the scheduler at {tls_cluster.address}" in lines[0], r.stderr
    assert "certificate" in lines[0]
    assert took < 45
    assert not os.path.exists(stores / "rogue.zarr")


def test_plain_tcp_client_cannot_talk_to_a_tls_scheduler(tls_cluster):
    from pipeline import runtime
    from pipeline.errors import InputError

    plain = tls_cluster.address.replace("tls://", "tcp://")
    with pytest.raises(InputError, match="cannot reach the scheduler"):
        with runtime.connect(plain, timeout=3):
            pass


def test_tls_options_with_a_tcp_address_are_a_usage_error(tls_cluster):
    from pipeline.cli import main

    assert main(["distances", "a", "b", "c", "--scheduler", "tcp://127.0.0.1:9",
                 "--tls-ca-file", tls_cluster.ca, "--tls-cert", tls_cluster.client_cert]) == 2


def _handshake(address, ca, cert=None, key=None):
    """'open' if the scheduler keeps a raw TLS connection open, 'refused' if it drops it."""
    import socket
    import ssl

    host, port = address[len("tls://"):].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False  # the cluster's certificates name nodes by IP, as distributed does
    if cert:
        ctx.load_cert_chain(cert, key)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                s.settimeout(2)
                # TLS 1.3: a rejection of the client's certificate arrives on the first read.
                return "refused" if s.recv(1) == b"" else "open"
        except TimeoutError:
            return "open"  # the scheduler is waiting for our first message
        except (ssl.SSLError, ConnectionError):
            return "refused"


def test_the_scheduler_itself_refuses_a_tls_client_without_certificate(tls_cluster):
    """Not only our CLI's check: the scheduler's TLS handshake demands a client certificate."""
    c = tls_cluster
    assert _handshake(c.address, c.ca, c.client_cert, c.client_key) == "open"
    assert _handshake(c.address, c.ca) == "refused"
    assert _handshake(c.address, c.ca, c.rogue_cert, c.rogue_key) == "refused"
