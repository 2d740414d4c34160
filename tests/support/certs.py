"""The one certificate generator of the tests: a throw-away PKI made with the `openssl` command
(session-scoped fixture `pki`), and `issue` for what a test needs beyond it (chains).

Two CAs; server pairs (RSA and ECDSA, plus SNI certificates for an exact and a wildcard name,
and an ECDSA backend pair for localhost, backend.test and 127.0.0.1); client certificates:
valid, expired, revoked (with a CRL of the first CA), and one issued by the second CA.
`openssl ca` is used for the client side so dates and the CRL are real.
"""

import shutil
import subprocess
import types
from pathlib import Path

import pytest

CA_CONF = """\
[ca]
default_ca = the_ca
[the_ca]
dir = {dir}
database = {dir}/index.txt
serial = {dir}/serial
crlnumber = {dir}/crlnumber
new_certs_dir = {dir}/new
default_md = sha256
default_days = 3650
default_crl_days = 3650
policy = anything
unique_subject = no
copy_extensions = none
[anything]
commonName = supplied
organizationName = optional
organizationalUnitName = optional
[client_ext]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""

CLIENT_SUBJECT = "/CN=client.test/O=Client Org"


def _run(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def _ec_key(path, cwd):
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path,
         cwd=cwd)


def _rsa_key(path, cwd):
    _run("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", path,
         cwd=cwd)


def _make_ca(d, name, subject):
    cadir = d / name
    (cadir / "new").mkdir(parents=True)
    (cadir / "index.txt").write_text("")
    (cadir / "serial").write_text("1000\n")
    (cadir / "crlnumber").write_text("01\n")
    (cadir / "ca.cnf").write_text(CA_CONF.format(dir=cadir))
    _rsa_key(str(cadir / "ca.key"), d)
    _run("req", "-x509", "-new", "-key", str(cadir / "ca.key"), "-subj", subject, "-days", "3650",
         "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(cadir / "ca.pem"), cwd=d)
    return cadir


def _server_cert(d, cadir, name, cn, sans, rsa=True):
    key = d / (name + ".key")
    (_rsa_key if rsa else _ec_key)(str(key), d)
    csr = d / (name + ".csr")
    _run("req", "-new", "-key", str(key), "-subj", "/CN=" + cn, "-out", str(csr), cwd=d)
    ext = d / (name + ".ext")
    ext.write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                   "subjectAltName=" + ",".join(sans) + "\n")
    crt = d / (name + ".pem")
    _run("x509", "-req", "-in", str(csr), "-CA", str(cadir / "ca.pem"), "-CAkey",
         str(cadir / "ca.key"), "-CAcreateserial", "-days", "3650", "-sha256", "-extfile", str(ext),
         "-out", str(crt), cwd=d)
    return str(crt), str(key)


def _client_cert(d, cadir, name, subject, serial=None, start=None, end=None):
    key = d / (name + ".key")
    _ec_key(str(key), d)
    csr = d / (name + ".csr")
    _run("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr), cwd=d)
    if serial is not None:
        (cadir / "serial").write_text("%s\n" % serial)
    crt = d / (name + ".pem")
    args = ["ca", "-batch", "-config", str(cadir / "ca.cnf"), "-cert", str(cadir / "ca.pem"),
            "-keyfile", str(cadir / "ca.key"), "-in", str(csr), "-out", str(crt),
            "-extensions", "client_ext", "-notext", "-preserveDN"]
    if start:
        args += ["-startdate", start, "-enddate", end]
    _run(*args, cwd=d)
    return str(crt), str(key)


def make_pki(d):
    d = Path(d)
    ca = _make_ca(d, "ca", "/O=Test Org/CN=Test CA")
    other = _make_ca(d, "other", "/O=Other Org/CN=Other CA")
    p = types.SimpleNamespace(dir=str(d), ca=str(ca / "ca.pem"), other_ca=str(other / "ca.pem"))
    p.server_rsa = _server_cert(d, ca, "server-rsa", "mail.test",
                                ["DNS:mail.test", "DNS:localhost", "IP:127.0.0.1"])
    p.server_ec = _server_cert(d, ca, "server-ec", "mail.test",
                               ["DNS:mail.test", "DNS:localhost", "IP:127.0.0.1"], rsa=False)
    p.sni_exact = _server_cert(d, ca, "sni-exact", "imap.example.com",
                               ["DNS:imap.example.com"], rsa=False)
    p.sni_wild = _server_cert(d, ca, "sni-wild", "*.example.org", ["DNS:*.example.org"],
                              rsa=False)
    p.backend = _server_cert(d, ca, "backend", "server.test",
                             ["DNS:localhost", "DNS:backend.test", "IP:127.0.0.1"], rsa=False)
    p.client = _client_cert(d, ca, "client", CLIENT_SUBJECT, serial="1A2B3C")
    p.client_serial = "1A2B3C"
    p.expired = _client_cert(d, ca, "expired", "/CN=expired.test", start="20200101000000Z",
                             end="20210101000000Z")
    p.revoked = _client_cert(d, ca, "revoked", "/CN=revoked.test")
    p.stranger = _client_cert(d, other, "stranger", "/CN=stranger.test")
    _run("ca", "-batch", "-config", str(ca / "ca.cnf"), "-cert", str(ca / "ca.pem"), "-keyfile",
         str(ca / "ca.key"), "-revoke", p.revoked[0], cwd=d)
    p.crl = str(d / "ca.crl")
    _run("ca", "-batch", "-config", str(ca / "ca.cnf"), "-cert", str(ca / "ca.pem"), "-keyfile",
         str(ca / "ca.key"), "-gencrl", "-out", p.crl, cwd=d)
    # an encrypted copy of the RSA server key and a password file with a wrong line first
    p.server_rsa_enc_key = str(d / "server-rsa-enc.key")
    _run("pkey", "-in", p.server_rsa[1], "-aes256", "-passout", "pass:s3cret", "-out",
         p.server_rsa_enc_key, cwd=d)
    p.password_file = str(d / "passwords")
    Path(p.password_file).write_text("wrong\ns3cret\n")
    return p


def issue(d, name, subject, issuer_pem, issuer_key, ext, serial):
    """An ECDSA pair `name`.pem/.key in folder `d`, issued by (issuer_pem, issuer_key) with the
    extensions text `ext` and the given serial: for chains through intermediate CAs."""
    d = Path(d)
    _ec_key(name + ".key", d)
    _run("req", "-new", "-key", name + ".key", "-subj", subject, "-out", name + ".csr", cwd=d)
    (d / (name + ".ext")).write_text(ext)
    _run("x509", "-req", "-in", name + ".csr", "-CA", issuer_pem, "-CAkey", issuer_key,
         "-set_serial", serial, "-days", "3650", "-sha256", "-extfile", name + ".ext",
         "-out", name + ".pem", cwd=d)
    return str(d / (name + ".pem")), str(d / (name + ".key"))


def as_files(pki):
    """The PKI as {name: path} with the names the relay and backend TLS tests use: ca, otherca,
    server/server_key (the backend pair), client/client_key."""
    return {"ca": pki.ca, "otherca": pki.other_ca,
            "server": pki.backend[0], "server_key": pki.backend[1],
            "client": pki.client[0], "client_key": pki.client[1]}


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def certs(pki):
    """as_files(pki): {name: path}."""
    return as_files(pki)
