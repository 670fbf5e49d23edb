"""Deployment security on loopback: Flower's TLS and SuperNode authentication.

The test writes its own CA, SuperLink certificate (SAN 127.0.0.1 / localhost) and SuperNode
keys (EC P-384, OpenSSH), starts a SuperLink that serves HTTPS and requires authentication,
registers two SuperNodes' public keys, and runs one round of the tiny config on them; a
SuperNode with an unregistered key and one with no key are refused. The commands are the
README's (section "TLS and SuperNode authentication").

The deployment run is slow (every message starts a fresh `flwr-clientapp` process); the
certificates, keys and command lines are checked quickly without starting Flower.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from helpers.certs import make_node_key, make_tls
from helpers.loopback import CONNECTION, Loopback, two_node_overrides
from helpers.runs import check_run_outputs

# --------------------------------------------------------------------------- fast


def handshake(ca: Path, cert: Path, key: Path, hostname: str = "127.0.0.1") -> str:
    """One TLS handshake over loopback: the server presents `cert`, the client trusts `ca`."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(ca))  # verifies chain and hostname
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            connection, _ = listener.accept()
            with (
                connection,
                contextlib.suppress(ssl.SSLError),  # the client may refuse our certificate
                server_context.wrap_socket(connection, server_side=True) as tls,
            ):
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client_context.wrap_socket(raw, server_hostname=hostname) as tls,
            ):
                return tls.recv(2).decode()
        finally:
            thread.join(timeout=10)


def test_the_certificates_verify_for_loopback(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    ca.public_key().verify(  # signed by the CA (raises if not)
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert isinstance(cert.public_key().curve, ec.SECP384R1)
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    assert (tls.key.stat().st_mode & 0o777) == 0o600
    assert handshake(tls.ca, tls.cert, tls.key) == "ok"
    assert handshake(tls.ca, tls.cert, tls.key, hostname="localhost") == "ok"
    other = make_tls(tmp_path / "other")  # a client trusting another CA refuses the server
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(other.ca, tls.cert, tls.key)


def test_supernode_keys_are_openssh_ec_p384(tmp_path: Path) -> None:
    private_path = make_node_key(tmp_path, "node0")
    private = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
    public = (tmp_path / "node0.pub").read_bytes()
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert public.startswith(b"ecdsa-sha2-nistp384 ")
    assert serialization.load_ssh_public_key(public.strip()) == private.public_key()
    assert (private_path.stat().st_mode & 0o777) == 0o600
    assert make_node_key(tmp_path, "node1").read_bytes() != private_path.read_bytes()


def test_secure_commands_and_connection(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "certs")
    net = Loopback(tmp_path / "net", tls=tls)
    superlink = net.superlink_command()
    assert "--insecure" not in superlink and "--enable-supernode-auth" in superlink
    for flag, path in (
        ("--ssl-ca-certfile", tls.ca),
        ("--ssl-certfile", tls.cert),
        ("--ssl-keyfile", tls.key),
    ):
        assert superlink[superlink.index(flag) + 1] == str(path)
    key = tmp_path / "node0"
    node = net.supernode_command("partition-id=0 num-partitions=2", 9100, key, max_retries=2)
    assert "--insecure" not in node
    assert node[node.index("--root-certificates") + 1] == str(tls.ca)
    assert node[node.index("--auth-supernode-private-key") + 1] == str(key)
    assert node[node.index("--max-retries") + 1] == "2"
    assert node[node.index("--superlink") + 1] == f"127.0.0.1:{net.port}"
    config = (net.home / "config.toml").read_text()
    assert f'root-certificates = "{tls.ca}"' in config and "insecure" not in config
    plain = Loopback(tmp_path / "plain")  # the default stays the insecure loopback of §4
    assert "--insecure" in plain.superlink_command()
    assert "--insecure" in plain.supernode_command("partition-id=0", 9101)
    assert "insecure = true" in (plain.home / "config.toml").read_text()


# --------------------------------------------------------------------------- slow


@pytest.fixture
def secure_net(tmp_path: Path):
    certs = tmp_path / "certs"
    net = Loopback(tmp_path / "net", tls=make_tls(certs))
    net.keys = {name: make_node_key(certs, name) for name in ("node0", "node1", "intruder")}
    try:
        yield net
    finally:
        leftovers = net.stop()
        assert not leftovers, f"needed SIGKILL: {leftovers}"


def wait_exit(proc, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except Exception:
        return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_authenticated_supernodes_train_and_unknown_ones_are_refused(
    secure_net: Loopback, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    net, keys = secure_net, secure_net.keys
    net.start_superlink()  # HTTPS only: the health check verifies the certificate
    for name in ("node0", "node1"):
        assert net.register(keys[name].with_name(f"{name}.pub")).get("success") is True
    net.start_supernode("partition-id=0 num-partitions=2", key=keys["node0"])
    net.start_supernode("partition-id=1 num-partitions=2", key=keys["node1"])
    # same partition ids: had either been let in, the run would abort on a duplicate partition
    intruder = net.start_supernode("partition-id=0 num-partitions=2", keys["intruder"], 2)
    keyless = net.start_supernode("partition-id=1 num-partitions=2", None, 2)

    out_dir = tmp_path / "runs"
    overrides = two_node_overrides(tiny_bert_dir, rounds=1, name="secure")
    _, context = net.run_app(out_dir, overrides, timeout=600)
    runs = net.runs()
    assert len(runs) == 1 and runs[0]["status"] == "finished:completed", f"{runs}\n{context}"
    history = check_run_outputs(out_dir / "secure", 1)
    assert history[1]["ok"] == 2 and history[1]["clients"] == [0, 1]

    listed = net.flwr("supernode", "ls", CONNECTION, "--format", "json", timeout=60)
    assert listed.returncode == 0 and listed.stdout.count('"node-id"') == 2, listed.stdout
    refusals = {  # Flower 1.42's words; supernode<i>.log
        2: (intruder, "[code: 2004] Failed to activate SuperNode"),
        3: (keyless, "[code: 2001] SuperNode authentication is enabled"),
    }
    for index, (proc, says) in refusals.items():
        code = wait_exit(proc, timeout=180)
        log = (net.root / f"supernode{index}.log").read_text(errors="replace")
        assert code not in (None, 0), f"supernode{index} still running or exit 0\n{log[-2000:]}"
        assert "Exit Code: 305" in log and says in log, log[-2000:]
