"""TLS towards clients: contexts, implicit TLS, STARTTLS/STLS, client certificates
(ngx_mail_ssl_module.c; ngx_mail_ssl_handshake_handler and ngx_mail_verify_cert).

One `ServerTLS` per server block is built at start and on reload (`build_server`, called by
tls_contexts.prepare, so `-t` finds a bad certificate, key or CA file) and kept on the
ServerConf: sessions never build contexts.  The values were checked by the config loader
(config/loader.py `_check_tls`); what needs a file or OpenSSL is checked here.
`handshake(sock, conf, log)` runs the server handshake on a client socket and returns a
`Handshake`: the socket the session holds from then on (a blocking `ssl.SSLSocket` with
timeouts), the client-certificate verdict as nginx's ngx_mail_verify_cert gives it, and the
Auth-SSL-* headers for auth_http.  The session applies it (Session.apply_handshake).

Python's `ssl` has no verify callback, no ALPN refusal, no verify-depth, session-cache or
ticket-key knobs; tls_native.py reaches them in the OpenSSL library `_ssl` uses, after
validating every pointer.  When it cannot, the directives that need it are configuration errors (`_require_native`), never
silently weaker checks; only ALPN refusal, which no directive controls, is then left out.
"""

from __future__ import annotations

import errno as errno_mod
import hashlib
import os
import selectors
import ssl
import tempfile
import time
import warnings
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

from . import metrics, tls_cache
from .config.syntax import parse_size
from .errors import ConfigError
from .protocols import PROTOCOLS
from .tls_native import Native, PointerError, native, native_error

if TYPE_CHECKING:
    import socket

    from .config import ServerConf


# X509_V_ERR_* that `optional_no_ca` tolerates (ngx_ssl_verify_error_optional).
_OPTIONAL_NO_CA_ERRORS = frozenset((18, 19, 20, 21, 27))

_TLS_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_PROTOCOL_ORDER = ["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
_NO_PROTOCOL_OPTION = {
    "TLSv1": "OP_NO_TLSv1", "TLSv1.1": "OP_NO_TLSv1_1",
    "TLSv1.2": "OP_NO_TLSv1_2", "TLSv1.3": "OP_NO_TLSv1_3",
}


# ---------------------------------------------------------------------------------------------
# contexts

class ServerTLS:
    """Everything TLS of one server block, built once at configuration load."""

    def __init__(self, conf: ServerConf):
        self.conf = conf
        self.protocol = conf.protocol
        self.verify = conf.ssl_verify_client
        self.native = None
        self.ticket_keys = None     # [48- or 80-byte key]: the first encrypts, all decrypt
        self.zone = None            # tls_cache.SessionStore of ssl_session_cache shared:
        self.context = None
        self.sni = []               # [(pattern, context)]: exact names first, then wildcards


def _err(conf, key, message):
    f, line = conf.where(key)
    return ConfigError(message, f or conf.file, line or conf.line, key)


def uses_tls(conf: ServerConf) -> bool:
    """True for a server with `listen ... ssl` or `starttls`."""
    return conf.starttls != "off" or any(li.ssl for li in conf.listen)


def build_server(conf: ServerConf) -> Optional[ServerTLS]:
    """The ServerTLS of server `conf` (None without TLS), for tls_contexts.prepare.

    Raises ConfigError (file:line) for a file that cannot be used or what Python cannot do."""
    if not uses_tls(conf):
        return None
    st = ServerTLS(conf)
    st.native = native()
    st.ticket_keys = _ticket_keys(conf, st)
    st.zone = _shared_zone(conf, st)
    pairs = list(zip(conf.ssl_certificate, conf.ssl_certificate_key))
    st.context = _build_context(conf, st, pairs, "ssl_certificate")
    exact, wild = [], []
    for name, cert, key in conf.ssl_certificate_sni or ():
        ctx = _build_context(conf, st, [(cert, key)], "ssl_certificate_sni")
        (wild if name.startswith("*.") else exact).append((name, ctx))
    wild.sort(key=lambda item: -len(item[0]))
    st.sni = exact + wild
    if st.sni:
        st.context.sni_callback = _make_sni_callback(st)
    return st


def server_tls(conf: ServerConf) -> ServerTLS:
    """The ServerTLS that tls_contexts.prepare built for `conf`."""
    st = conf._tls
    if st is None:
        raise RuntimeError("no TLS context prepared for server %r" % conf.name)
    return st


def server_context(conf: ServerConf) -> ssl.SSLContext:
    return server_tls(conf).context


def _needs_native_cache(conf):
    return conf.ssl_session_cache != ["none"] or conf.ssl_session_timeout != 300


_instance_secret = None


def _ticket_keys(conf, st):
    """The ticket keys of server `conf` (ngx_ssl_session_ticket_keys): its ssl_session_ticket_key
    files, else one key of this instance when tickets are on and the native layer is there.

    The instance key comes from a secret drawn once per process, i.e. by the master at start:
    every worker (forked after) and every reload (built in the master again) has the same.  Each
    server's key is derived from it with the server's name, listen addresses and client
    certificate settings, so that a ticket never carries a client-certificate verdict into
    another server or policy."""
    global _instance_secret
    if conf.ssl_session_ticket_key:
        keys = [_read_ticket_key(conf, path) for path in conf.ssl_session_ticket_key]
        if conf.ssl_session_tickets:
            _require_native(conf, st, "ssl_session_ticket_key", "a ticket key callback")
            if st.native.tickets_error:
                raise _err(conf, "ssl_session_ticket_key", '"ssl_session_ticket_key" cannot be '
                           "honoured: the OpenSSL ticket key functions could not be reached (%s)"
                           % st.native.tickets_error)
        return keys
    if not conf.ssl_session_tickets or st.native is None or st.native.tickets_error:
        return None         # OpenSSL's own random keys, per context
    if _instance_secret is None:
        _instance_secret = os.urandom(32)
    identity = repr((conf.name, [li.text for li in conf.listen], conf.ssl_verify_client,
                     conf.ssl_verify_depth, conf.ssl_client_certificate,
                     conf.ssl_trusted_certificate, conf.ssl_crl)).encode()
    key = b"".join(hashlib.sha256(_instance_secret + part + identity).digest()
                   for part in (b"name", b"hmac", b"aes"))
    return [key[:16] + key[32:64] + key[64:96]]       # nginx's 80-byte layout


def _shared_zone(conf, st):
    """The zone of `ssl_session_cache shared:NAME:SIZE` (tls_cache.zone), or None."""
    for a in conf.ssl_session_cache:
        if a.startswith("shared:"):
            _require_native(conf, st, "ssl_session_cache", "session cache callbacks")
            if st.native.sessions_error:
                raise _err(conf, "ssl_session_cache", '"ssl_session_cache %s" cannot be honoured:'
                           " the OpenSSL session functions could not be reached (%s)"
                           % (a, st.native.sessions_error))
            _shared, name, size = a.split(":")
            return tls_cache.zone(name, parse_size(size))
    return None


def _read_ticket_key(conf, path):
    """One ssl_session_ticket_key file: nginx's 48 or 80 bytes, its messages."""
    try:
        with open(path, "rb") as f:
            data = f.read(81)
    except OSError as e:
        raise _err(conf, "ssl_session_ticket_key", 'open() "%s" failed %s'
                   % (path, _reason(e))) from None
    if len(data) not in (48, 80):
        raise _err(conf, "ssl_session_ticket_key", '"%s" must be 48 or 80 bytes' % path)
    return data


def _require_native(conf, st, key, what):
    if st.native is None:
        raise _err(conf, key, '"%s" cannot be honoured: %s needs OpenSSL functions that '
                   "Python's ssl module does not offer and mailproxy could not reach them (%s)"
                   % (key, what, native_error()))


def _build_context(conf, st, pairs, cert_key):
    n = st.native
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Python 3.9 sets SSL_OP_IGNORE_UNEXPECTED_EOF, 3.10+ and nginx's ngx_ssl_create do not: one
    # behaviour on every version (with it, TLSv1.3 stateful resumption failed now and then)
    ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    # -- protocols
    protos = conf.ssl_protocols           # SSLv2 and SSLv3 refused by the loader
    order = sorted(protos, key=_PROTOCOL_ORDER.index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            ctx.minimum_version = _TLS_VERSIONS[order[0]]
            ctx.maximum_version = _TLS_VERSIONS[order[-1]]
        except (ValueError, ssl.SSLError) as e:
            raise _err(conf, "ssl_protocols", '"ssl_protocols %s" cannot be set: %s'
                       % (" ".join(protos), e)) from None
        lo, hi = _PROTOCOL_ORDER.index(order[0]), _PROTOCOL_ORDER.index(order[-1])
        for name in _PROTOCOL_ORDER[lo:hi + 1]:
            if name not in protos:          # a gap such as "TLSv1 TLSv1.2"
                ctx.options |= getattr(ssl, _NO_PROTOCOL_OPTION[name])
    # -- ciphers
    try:
        ctx.set_ciphers(conf.ssl_ciphers)
    except ssl.SSLError:
        raise _err(conf, "ssl_ciphers", 'invalid "ssl_ciphers" value "%s": OpenSSL accepts none '
                   "of these ciphers" % conf.ssl_ciphers) from None
    if conf.ssl_prefer_server_ciphers:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    # -- certificates
    passwords = _passwords(conf)
    leaves = [_load_pair(conf, ctx, cert, key, passwords, cert_key) for cert, key in pairs]
    # -- client certificates
    verify = conf.ssl_verify_client
    if verify != "off":
        for key in ("ssl_client_certificate", "ssl_trusted_certificate"):
            path = getattr(conf, key)
            if path:
                try:
                    ctx.load_verify_locations(cafile=path)
                except (OSError, ssl.SSLError) as e:
                    raise _err(conf, key, 'cannot load "%s" file "%s": %s'
                               % (key, path, _reason(e))) from None
        if conf.ssl_crl:
            try:
                ctx.load_verify_locations(cafile=conf.ssl_crl)
            except (OSError, ssl.SSLError) as e:
                raise _err(conf, "ssl_crl", 'cannot load CRL file "%s": %s'
                           % (conf.ssl_crl, _reason(e))) from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
        # ngx_ssl_verify_callback, the certificate-error line and verify depth need the layer
        _require_native(conf, st, "ssl_verify_client", "a verify callback")
        if conf.ssl_client_certificate and not n.set_client_ca_list(ctx, conf.ssl_client_certificate):
            raise _err(conf, "ssl_client_certificate", 'no CA names in "%s"'
                       % conf.ssl_client_certificate)
    # -- key exchange
    if conf.ssl_dhparam:
        try:
            ctx.load_dh_params(conf.ssl_dhparam)
        except (OSError, ssl.SSLError) as e:
            raise _err(conf, "ssl_dhparam", 'cannot load "ssl_dhparam" file "%s": %s'
                       % (conf.ssl_dhparam, _reason(e))) from None
    curve = conf.ssl_ecdh_curve
    if curve != "auto":
        if ":" in curve:
            _require_native(conf, st, "ssl_ecdh_curve", "a list of curves")
            if not n.set_groups(ctx, curve):
                raise _err(conf, "ssl_ecdh_curve", 'invalid "ssl_ecdh_curve" value "%s"' % curve)
        else:
            try:
                ctx.set_ecdh_curve(curve)
            except (ValueError, ssl.SSLError):
                raise _err(conf, "ssl_ecdh_curve", 'unknown curve "%s" in "ssl_ecdh_curve"'
                           % curve) from None
    # -- sessions
    if not conf.ssl_session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
    elif len(st.ticket_keys or ()) == 1 and n.ticket_key(ctx, st.ticket_keys[0]):
        pass    # one 80-byte key: OpenSSL's own ticket code uses it, no Python per handshake
    elif st.ticket_keys:
        try:
            # on the context itself: a session's SSLSocket keeps it, and so the callback, alive
            ctx._mailproxy_tickets = n.ticket_keys(ctx, st.ticket_keys)
        except (RuntimeError, ValueError) as e:
            if conf.ssl_session_ticket_key:    # else OpenSSL's own key, as without the layer
                raise _err(conf, "ssl_session_ticket_key", '"ssl_session_ticket_key" cannot be '
                           "honoured: the ticket key callback could not be set (%s)"
                           % e) from None
    cache = conf.ssl_session_cache
    size = None
    if cache == ["off"]:
        mode = Native.SSL_SESS_CACHE_OFF
    elif cache == ["none"]:
        # nginx: tell clients sessions may be reused, store none (Outlook Express needs this)
        mode = Native.SSL_SESS_CACHE_SERVER | Native.SSL_SESS_CACHE_NO_INTERNAL_STORE
        size = 1
    else:
        mode = Native.SSL_SESS_CACHE_SERVER
        for a in cache:
            if a.startswith("builtin:"):
                size = int(a[8:])
        if st.zone is not None and not any(a.startswith("builtin") for a in cache):
            mode |= Native.SSL_SESS_CACHE_NO_INTERNAL      # shared: alone (ngx_ssl_session_cache)
    if n is not None:
        sid_ctx = _session_id_context(conf, leaves)
        n.session_cache(ctx, mode, size, conf.ssl_session_timeout, sid_ctx)
        if st.zone is not None:
            n.shared_cache(ctx, st.zone, sid_ctx, conf.ssl_session_timeout,
                           conf.ssl_session_tickets)
    elif _needs_native_cache(conf):
        _require_native(conf, st, "ssl_session_cache" if cache != ["none"]
                        else "ssl_session_timeout", "session cache settings")
    if conf.ssl_conf_command:
        _require_native(conf, st, "ssl_conf_command", "SSL_CONF_cmd()")
        bad = n.conf_commands(ctx, conf.ssl_conf_command)
        if bad is not None:
            raise _err(conf, "ssl_conf_command", 'SSL_CONF_cmd("%s") failed: OpenSSL does not '
                       "accept this command or its value" % bad)
    # -- ALPN (1.21.4+) and, last (Python's verify_mode setter would reset it), the callback
    if n is not None:
        # kept alive by the context itself, as long as OpenSSL may call it
        ctx._mailproxy_alpn = n.alpn_strict(ctx, PROTOCOLS[conf.protocol].alpn)
        if verify != "off":
            n.verify_accept_all(ctx, conf.ssl_verify_depth)
    else:
        ctx.set_alpn_protocols([PROTOCOLS[conf.protocol].alpn.decode()])
    return ctx


def _reason(e):
    if isinstance(e, ssl.SSLError):
        return "(SSL: %s)" % (e.reason or e.strerror or e)
    return "(%d: %s)" % (e.errno or 0, e.strerror or e)


def _passwords(conf):
    path = conf.ssl_password_file
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            lines = [ln.rstrip(b"\r\n") for ln in f.read().split(b"\n")]
    except OSError as e:
        raise _err(conf, "ssl_password_file", 'cannot open "ssl_password_file" "%s" %s'
                   % (path, _reason(e))) from None
    lines = [ln for ln in lines if ln]
    if not lines:
        raise _err(conf, "ssl_password_file", 'empty "ssl_password_file" "%s"' % path)
    return lines


def _materialize(value, stack):
    """A file path for a `data:` value (a temporary file, removed after loading)."""
    if not value.startswith("data:"):
        return value
    fd, path = tempfile.mkstemp(prefix="mailproxy-", suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(value[5:].encode())
    stack.append(path)
    return path


def _load_pair(conf, ctx, cert, key, passwords, cert_key):
    temps = []
    try:
        cpath, kpath = _materialize(cert, temps), _materialize(key, temps)
        for what, path in (("certificate", cpath), ("certificate key", kpath)):
            if not os.path.exists(path):
                raise _err(conf, cert_key if what == "certificate" else "ssl_certificate_key",
                           'cannot load %s "%s": BIO_new_file() failed (2: No such file or '
                           "directory)" % (what, cert if what == "certificate" else key))
        last = None
        for pw in (passwords or [b""]):
            try:
                ctx.load_cert_chain(cpath, kpath, password=pw)
                return _leaf_der(cpath)
            except ssl.SSLError as e:
                last = e
            except OSError as e:
                last = e
                break
        raise _err(conf, cert_key, 'cannot load certificate "%s" with key "%s": %s'
                   % (cert, key, _reason(last)))
    finally:
        for path in temps:
            try:
                os.unlink(path)
            except OSError:
                pass


def _leaf_der(path):
    """The DER of the first certificate in PEM file `path` (the one load_cert_chain serves)."""
    with open(path, "rb") as f:
        text = f.read().decode("ascii", "replace")
    begin = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        return b""
    return ssl.PEM_cert_to_DER_cert(text[begin:end + len("-----END CERTIFICATE-----")])


def _session_id_context(conf, leaves):
    """ngx_ssl_session_id_context: SHA-1 over "MAIL" and each certificate's SHA-1, so a session
    or ticket made for one certificate never resumes on a server block with another.  With
    client certificates, the CA files and the verify mode go in too (nginx takes the CA names):
    a session never carries one block's client-certificate verdict into another's."""
    md = hashlib.sha1(b"MAIL")
    for der in leaves:
        md.update(hashlib.sha1(der).digest())
    if conf.ssl_verify_client != "off":
        md.update(conf.ssl_verify_client.encode())
        for path in (conf.ssl_client_certificate, conf.ssl_trusted_certificate):
            if path:
                with open(path, "rb") as f:
                    md.update(hashlib.sha1(f.read()).digest())
    return md.digest()


def _make_sni_callback(st):
    names = st.sni

    def callback(sslsock, server_name, _ctx):
        if not server_name:
            return None
        name = server_name.lower().rstrip(".")
        try:
            sslsock._mailproxy_sni = name
        except AttributeError:
            pass
        for pattern, ctx in names:
            if pattern == name or (pattern.startswith("*.") and name.endswith(pattern[1:])
                                   and len(name) > len(pattern) - 1):
                sslsock.context = ctx
                break
        return None
    return callback


# ---------------------------------------------------------------------------------------------
# sessions

class Handshake:
    """What a server handshake leaves for the session to apply (Session.apply_handshake).

    sock: the socket the session holds from now on (the SSLSocket once wrapped, whether the
    handshake succeeded or not); done: the handshake completed (close_notify before closing);
    headers: the Auth-SSL-* pairs, None when the session must close; reply: for a refused
    client certificate, the protocol's line to send before closing (ngx_mail_verify_cert)."""

    __slots__ = ("sock", "done", "headers", "reply")

    def __init__(self, sock: socket.socket, done: bool = False,
                 headers: Optional[List[Tuple[str, str]]] = None, reply: Optional[bytes] = None):
        self.sock = sock
        self.done = done
        self.headers = headers
        self.reply = reply

    @property
    def ok(self) -> bool:
        return self.headers is not None


def handshake(sock: socket.socket, conf: ServerConf, log: Callable[..., None],
              deadline: Optional[float] = None) -> Handshake:
    """Run the server handshake on `sock` (implicit TLS or after STARTTLS/STLS); returns a
    Handshake.

    A failed or stalled handshake is logged at info (`log(level, message, err=None)`, the
    session's logger) and comes back not ok; so does a refused client certificate, with the
    protocol's line to send.  `deadline` (time.monotonic()) bounds the whole handshake; by
    default `timeout` from now.
    """
    st = server_tls(conf)
    if deadline is None:
        deadline = time.monotonic() + conf.timeout
    try:
        sock = st.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except OSError as e:
        log("info", "SSL setup failed: %s" % e)
        return Handshake(sock)
    sock.setblocking(False)
    failed = Handshake(sock)
    # poll(2), never select(2): descriptors above 1023 are common here; poll needs
    # no descriptor of its own (epoll would cost one per handshake, and fail at the fd limit)
    with selectors.PollSelector() as sel:
        registered = 0
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                want = selectors.EVENT_READ
            except ssl.SSLWantWriteError:
                want = selectors.EVENT_WRITE
            except ssl.SSLError as e:
                log("info", "SSL_do_handshake() failed (SSL: %s)" % _ssl_text(e))
                return failed
            except OSError as e:
                if e.errno in (None, 0):
                    log("info", "peer closed connection in SSL handshake")
                else:
                    log("info", "SSL_do_handshake() failed", err=e.errno)
                return failed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log("info", "client timed out", err=errno_mod.ETIMEDOUT)
                return failed
            try:
                if not registered:
                    sel.register(sock, want)
                elif registered != want:
                    sel.modify(sock, want)
                registered = want
                sel.select(remaining)
            except (OSError, ValueError) as e:    # never expected: say so, do not just close
                errno = getattr(e, "errno", None)
                log("error", "%s() failed%s" % (type(sel).__name__,
                                                 "" if errno else " (%s)" % e), err=errno)
                return failed
    sock.setblocking(True)
    sock.settimeout(conf.timeout)
    metrics.tls_handshake(sock.version(), sock.session_reused)
    if sock.session_reused:     # ngx_ssl_handshake_log's debug line
        log("debug", "SSL reused session")
    peer = None
    if st.verify != "off":      # build_server made sure the native layer is there
        try:
            p = st.native.ssl_ptr(sock)
            peer = st.native.verify_result(p) + st.native.peer_dns(p)
        except PointerError as e:
            log("error", "client SSL certificate cannot be checked: %s" % e)
            return Handshake(sock, done=True)
    reply = _check_client_cert(log, st, sock, peer)
    if reply is not None:
        return Handshake(sock, done=True, reply=reply)
    return Handshake(sock, done=True, headers=_ssl_headers(conf, st, sock, peer))


def _ssl_text(e):
    text = getattr(e, "verify_message", None) or e.reason or str(e)
    lib = getattr(e, "library", None)
    return "%s%s" % ("" if not lib else "%s: " % lib, text)


def _check_client_cert(log, st, sock, peer):
    """ngx_mail_verify_cert: the protocol's error line (the session sends it and closes), or
    None for an accepted client.

    peer: (verify code, its text, subject, issuer) from the native layer."""
    if st.verify == "off":
        return None
    rc, text = peer[0], peer[1]
    if rc != 0 and not (st.verify == "optional_no_ca" and rc in _OPTIONAL_NO_CA_ERRORS):
        log("info", "client SSL certificate verify error: (%d:%s)" % (rc, text))
        return PROTOCOLS[st.protocol].cert_error
    if st.verify == "on" and sock.getpeercert(binary_form=True) is None:
        log("info", "client sent no required SSL certificate")
        return PROTOCOLS[st.protocol].no_cert
    return None


def _ssl_headers(conf, st, sock, peer):
    headers = [("Auth-SSL", "on")]
    version = sock.version()
    if version:
        headers.append(("Auth-SSL-Protocol", version))
    cipher = sock.cipher()
    if cipher:
        headers.append(("Auth-SSL-Cipher", cipher[0]))
    if st.verify != "off":
        der = sock.getpeercert(binary_form=True)
        if der is None:
            headers.append(("Auth-SSL-Verify", "NONE"))
        else:
            rc, text, subject, issuer = peer
            headers.append(("Auth-SSL-Verify", "SUCCESS" if rc == 0 else "FAILED:" + text))
            if subject:
                headers.append(("Auth-SSL-Subject", subject))
            if issuer:
                headers.append(("Auth-SSL-Issuer", issuer))
            serial = (sock.getpeercert() or {}).get("serialNumber")
            if serial:
                headers.append(("Auth-SSL-Serial", serial))
            headers.append(("Auth-SSL-Fingerprint", hashlib.sha1(der).hexdigest()))
            if conf.auth_http_pass_client_cert:
                headers.append(("Auth-SSL-Cert", ssl.DER_cert_to_PEM_cert(der)))
    name = getattr(sock, "_mailproxy_sni", None)
    if name:
        headers.append(("Auth-SSL-Server-Name", name))
    return headers


def shutdown(sock: socket.socket) -> None:
    """close_notify before closing a TLS connection we end (best effort, never blocks)."""
    if not isinstance(sock, ssl.SSLSocket):
        return
    try:
        sock.setblocking(False)
        sock.unwrap()
    except (OSError, ValueError):
        pass
