"""The OpenSSL calls Python's ssl module does not offer, through ctypes.

Python's `ssl` has no verify callback, no ALPN refusal, no verify-depth, session-cache or
ticket-key knobs;
nginx behaviour depends on them, so `Native` reaches the very same OpenSSL library the `_ssl`
module uses for a handful of documented OpenSSL calls on the SSL_CTX/SSL objects behind
Python's own SSLContext/SSLSocket.

Those pointers are read from CPython's object layout, so each one is validated before OpenSSL
ever sees it, with checks that cannot crash: the object is large enough for the field, the
pointer lies in readable memory of this process (/proc/self/maps), and only then read-only
OpenSSL getters compare it with what Python reports (SSL_CTX: options and verify mode; SSL:
SSL_get_SSL_CTX() against the validated SSL_CTX*). A start-up self-test runs every check on
fresh objects; if anything fails, or MAILPROXY_NO_NATIVE_TLS=1 is set, `native()` is None and
the directives that need it are start errors (tls.py), never silently weaker checks.
"""

from __future__ import annotations

import os
import ssl
import threading
import weakref
from typing import Any, List, Optional, Sequence, Tuple, Union

ENV_OFF = "MAILPROXY_NO_NATIVE_TLS"

# Bytes of the OpenSSL structures the getters may read, checked readable before any call
# (OpenSSL 3.0: SSL_CTX options at 312; SSL's ctx field at 2472, SSL_CONNECTION larger still).
_CTX_SPAN = 1024
_SSL_SPAN = 4096


class PointerError(RuntimeError):
    """A pointer read from Python's object layout failed validation (nothing was called)."""


def _readable_spans():
    """[[start, end]] of this process's readable mappings, adjacent ones merged."""
    spans = []
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            fields = line.split(None, 2)
            if len(fields) < 2 or not fields[1].startswith(b"r"):
                continue
            lo, _, hi = fields[0].partition(b"-")
            lo, hi = int(lo, 16), int(hi, 16)
            if spans and spans[-1][1] == lo:
                spans[-1][1] = hi
            else:
                spans.append([lo, hi])
    return spans


def readable(addr: Optional[int], size: int, spans: Optional[List[List[int]]] = None,
             align: int = 8) -> bool:
    """True when [addr, addr+size) lies in readable memory of this process (never touches it)."""
    if not addr or addr % align:
        return False
    end = addr + size
    return any(lo <= addr and end <= hi for lo, hi in (spans or _readable_spans()))


class Native:
    """Documented OpenSSL functions of the libssl/libcrypto `_ssl` is linked against."""

    SSL_VERIFY_PEER = 1
    SSL_CTRL_SET_SESS_CACHE_SIZE = 42
    SSL_CTRL_SET_SESS_CACHE_MODE = 44
    SSL_CTRL_SET_GROUPS_LIST = 92
    SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB = 72
    SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
    TLS1_3_VERSION = 0x0304
    SSL_SESS_CACHE_OFF = 0
    SSL_SESS_CACHE_SERVER = 2
    SSL_SESS_CACHE_NO_INTERNAL_STORE = 0x200
    SSL_SESS_CACHE_NO_INTERNAL = 0x300          # no internal lookup, no internal store
    BIO_CTRL_INFO = 3
    # XN_FLAG_RFC2253: ASN1_STRFLGS_RFC2253 | XN_FLAG_SEP_COMMA_PLUS | XN_FLAG_DN_REV
    #                  | XN_FLAG_FN_SN | XN_FLAG_DUMP_UNKNOWN_FIELDS
    XN_FLAG_RFC2253 = (0x1 | 0x2 | 0x4 | 0x10 | 0x100 | 0x200) | (1 << 16) | (1 << 20) | (1 << 24)

    def __init__(self):
        import ctypes
        import _ssl
        self.ct = ct = ctypes
        lib = ct.CDLL(getattr(_ssl, "__file__", None))   # dlsym searches its libssl/libcrypto
        vp, i, L = ct.c_void_p, ct.c_int, ct.c_long

        def fn(name, res, *args):
            f = getattr(lib, name)
            f.restype = res
            f.argtypes = list(args)
            return f
        self.SSL_CTX_set_verify = fn("SSL_CTX_set_verify", None, vp, i, vp)
        self.SSL_CTX_get_verify_mode = fn("SSL_CTX_get_verify_mode", i, vp)
        self.SSL_CTX_get_options = fn("SSL_CTX_get_options", ct.c_uint64, vp)
        self.SSL_CTX_set_verify_depth = fn("SSL_CTX_set_verify_depth", None, vp, i)
        self.SSL_CTX_ctrl = fn("SSL_CTX_ctrl", L, vp, i, L, vp)
        self.SSL_CTX_set_timeout = fn("SSL_CTX_set_timeout", L, vp, L)
        self.SSL_CTX_set_session_id_context = fn("SSL_CTX_set_session_id_context", i, vp,
                                                 ct.c_char_p, ct.c_uint)
        self.SSL_CTX_set_alpn_select_cb = fn("SSL_CTX_set_alpn_select_cb", None, vp, vp, vp)
        self.SSL_load_client_CA_file = fn("SSL_load_client_CA_file", vp, ct.c_char_p)
        self.SSL_CTX_set_client_CA_list = fn("SSL_CTX_set_client_CA_list", None, vp, vp)
        self.SSL_get_SSL_CTX = fn("SSL_get_SSL_CTX", vp, vp)
        self.SSL_get_verify_result = fn("SSL_get_verify_result", L, vp)
        self.X509_verify_cert_error_string = fn("X509_verify_cert_error_string", ct.c_char_p, L)
        try:
            self.SSL_get_peer_certificate = fn("SSL_get1_peer_certificate", vp, vp)
        except AttributeError:   # OpenSSL 1.1
            self.SSL_get_peer_certificate = fn("SSL_get_peer_certificate", vp, vp)
        self.X509_free = fn("X509_free", None, vp)
        self.X509_get_subject_name = fn("X509_get_subject_name", vp, vp)
        self.X509_get_issuer_name = fn("X509_get_issuer_name", vp, vp)
        self.BIO_s_mem = fn("BIO_s_mem", vp)
        self.BIO_new = fn("BIO_new", vp, vp)
        self.BIO_free = fn("BIO_free", i, vp)
        self.BIO_ctrl = fn("BIO_ctrl", L, vp, i, L, vp)
        self.X509_NAME_print_ex = fn("X509_NAME_print_ex", i, vp, vp, i, ct.c_ulong)
        self.SSL_CONF_CTX_new = fn("SSL_CONF_CTX_new", vp)
        self.SSL_CONF_CTX_set_flags = fn("SSL_CONF_CTX_set_flags", ct.c_uint, vp, ct.c_uint)
        self.SSL_CONF_CTX_set_ssl_ctx = fn("SSL_CONF_CTX_set_ssl_ctx", None, vp, vp)
        self.SSL_CONF_cmd = fn("SSL_CONF_cmd", i, vp, ct.c_char_p, ct.c_char_p)
        self.SSL_CONF_CTX_finish = fn("SSL_CONF_CTX_finish", i, vp)
        self.SSL_CONF_CTX_free = fn("SSL_CONF_CTX_free", None, vp)
        self.VERIFY_CB = ct.CFUNCTYPE(i, i, vp)
        self.ALPN_CB = ct.CFUNCTYPE(i, vp, ct.POINTER(vp), ct.POINTER(ct.c_ubyte), vp,
                                    ct.c_uint, vp)
        # nginx's ngx_ssl_verify_callback: record the result, never fail the handshake.
        self.accept_all = self.VERIFY_CB(lambda ok, store: 1)
        self.head = object.__basicsize__            # PyObject_HEAD
        self.ptr = ct.sizeof(vp)
        self._selftest()
        try:                        # apart: without it, only ssl_session_ticket_key is refused
            self.tickets_error = None
            self._ticket_api(fn)
        except AttributeError as e:
            self.tickets_error = "AttributeError: %s" % e
        try:                        # apart: without it, only ssl_session_cache shared: is refused
            self.sessions_error = None
            self._session_api(fn)
        except AttributeError as e:
            self.sessions_error = "AttributeError: %s" % e

    def _session_api(self, fn):
        """The external session cache callbacks (ngx_ssl_session_cache with a shm_zone) and
        their global trampolines: made once, they live as long as the process, so OpenSSL never
        calls a freed one (SSL_CTX_free calls the remove callback); each finds its zone by the
        SSL_CTX (`_zones`, nginx's SSL_CTX_set_ex_data), dropped before that SSL_CTX is freed."""
        ct = self.ct
        vp, i, u = ct.c_void_p, ct.c_int, ct.c_uint
        self.NEW_CB = ct.CFUNCTYPE(i, vp, vp)
        self.GET_CB = ct.CFUNCTYPE(vp, vp, vp, i, ct.POINTER(i))
        self.REMOVE_CB = ct.CFUNCTYPE(None, vp, vp)
        self.SSL_CTX_sess_set_new_cb = fn("SSL_CTX_sess_set_new_cb", None, vp, self.NEW_CB)
        self.SSL_CTX_sess_set_get_cb = fn("SSL_CTX_sess_set_get_cb", None, vp, self.GET_CB)
        self.SSL_CTX_sess_set_remove_cb = fn("SSL_CTX_sess_set_remove_cb", None, vp,
                                             self.REMOVE_CB)
        self.i2d_SSL_SESSION = fn("i2d_SSL_SESSION", i, vp, ct.POINTER(vp))
        self.d2i_SSL_SESSION = fn("d2i_SSL_SESSION", vp, vp, ct.POINTER(vp), ct.c_long)
        self.SSL_SESSION_get_id = fn("SSL_SESSION_get_id", vp, vp, ct.POINTER(u))
        self.SSL_SESSION_get0_id_context = fn("SSL_SESSION_get0_id_context", vp, vp,
                                              ct.POINTER(u))
        self.SSL_SESSION_free = fn("SSL_SESSION_free", None, vp)
        self.SSL_version_ = fn("SSL_version", i, vp)
        self._zones = {}            # SSL_CTX*: (store, session id context, timeout, tickets)
        self._new_cb = self.NEW_CB(self._new_session)
        self._get_cb = self.GET_CB(self._get_session)
        self._remove_cb = self.REMOVE_CB(self._remove_session)

    def _ticket_api(self, fn):
        """libcrypto/libssl functions of the ticket key callback (ngx_ssl_ticket_key_callback):
        OpenSSL 3's EVP_MAC callback, else 1.1's HMAC_CTX one."""
        ct = self.ct
        vp, i = ct.c_void_p, ct.c_int
        self.RAND_bytes = fn("RAND_bytes", i, vp, i)
        self.EVP_aes_128_cbc = fn("EVP_aes_128_cbc", vp)
        self.EVP_aes_256_cbc = fn("EVP_aes_256_cbc", vp)
        self.EVP_EncryptInit_ex = fn("EVP_EncryptInit_ex", i, vp, vp, vp, vp, vp)
        self.EVP_DecryptInit_ex = fn("EVP_DecryptInit_ex", i, vp, vp, vp, vp, vp)
        self.SSL_version = fn("SSL_version", i, vp)
        self.TICKET_CB = ct.CFUNCTYPE(i, vp, vp, vp, vp, vp, i)
        try:
            self.set_ticket_cb = fn("SSL_CTX_set_tlsext_ticket_key_evp_cb", i, vp, self.TICKET_CB)
            self.EVP_MAC_CTX_set_params = fn("EVP_MAC_CTX_set_params", i, vp, vp)
            self.ticket_evp = True
        except AttributeError:      # OpenSSL 1.1: SSL_CTX_set_tlsext_ticket_key_cb, a macro
            ctrl = fn("SSL_CTX_callback_ctrl", ct.c_long, vp, i, self.TICKET_CB)
            self.set_ticket_cb = lambda p, cb: ctrl(p, self.SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB, cb)
            self.HMAC_Init_ex = fn("HMAC_Init_ex", i, vp, vp, i, vp, vp)
            self.EVP_sha256 = fn("EVP_sha256", vp)
            self.ticket_evp = False

    # -- pointers behind Python objects, validated before use ---------------------------------
    def _field(self, obj, offset, what):
        """The pointer stored at `offset` in CPython object `obj`, if the object has that field."""
        if type(obj).__basicsize__ < offset + self.ptr:
            raise PointerError("%s: %s is smaller than its expected layout"
                               % (what, type(obj).__name__))
        return self.ct.c_void_p.from_address(id(obj) + offset).value

    def ctx_ptr(self, context: ssl.SSLContext, spans: Optional[List[List[int]]] = None) -> int:
        """SSL_CTX* of an ssl.SSLContext (PySSLContext: PyObject_HEAD; SSL_CTX *ctx; ...)."""
        p = self._field(context, self.head, "SSL_CTX pointer")
        if not readable(p, _CTX_SPAN, spans):
            raise PointerError("SSL_CTX pointer check failed: not in readable memory")
        if self.SSL_CTX_get_options(p) != int(context.options) \
                or (self.SSL_CTX_get_verify_mode(p) & 3) != _mode_bits(context.verify_mode):
            raise PointerError("SSL_CTX pointer check failed: options or verify mode differ")
        return p

    def ssl_ptr(self, sslsock: Union[ssl.SSLSocket, ssl.SSLObject]) -> int:
        """SSL* of an ssl.SSLSocket or SSLObject (PySSLSocket: PyObject_HEAD; PyObject *Socket;
        SSL *ssl; ...), checked to belong to the socket's current SSL_CTX (SNI may switch it)."""
        obj = getattr(sslsock, "_sslobj", None)
        if obj is None:
            raise PointerError("SSL pointer check failed: no _sslobj")
        p = self._field(obj, self.head + self.ptr, "SSL pointer")
        spans = _readable_spans()
        if not readable(p, _SSL_SPAN, spans):
            raise PointerError("SSL pointer check failed: not in readable memory")
        ctx = self.ctx_ptr(sslsock.context, spans)
        if self.SSL_get_SSL_CTX(p) != ctx:
            raise PointerError("SSL pointer check failed: SSL_get_SSL_CTX() differs")
        return p

    def _selftest(self):
        """Every pointer check on fresh objects: two contexts, option and mode changes, an SSL."""
        a = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        b = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        for opt in (0, ssl.OP_NO_TICKET):
            a.options |= opt
            self.ctx_ptr(a)
        a.verify_mode = ssl.CERT_OPTIONAL
        pa, pb = self.ctx_ptr(a), self.ctx_ptr(b)
        if pa == pb:
            raise PointerError("two SSLContexts gave one SSL_CTX pointer")
        obj = a.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
        self.ssl_ptr(obj)
        if self.SSL_get_SSL_CTX(self.ssl_ptr(obj)) == pb:
            raise PointerError("SSL pointer check failed: wrong SSL_CTX")

    # -- operations ----------------------------------------------------------------------------
    def verify_accept_all(self, context: ssl.SSLContext, depth: int) -> None:
        p = self.ctx_ptr(context)
        self.SSL_CTX_set_verify(p, self.SSL_VERIFY_PEER, self.accept_all)
        self.SSL_CTX_set_verify_depth(p, depth)

    def set_client_ca_list(self, context: ssl.SSLContext, path: str) -> bool:
        names = self.SSL_load_client_CA_file(os.fsencode(path))
        if not names:
            return False
        self.SSL_CTX_set_client_CA_list(self.ctx_ptr(context), names)
        return True

    def set_groups(self, context: ssl.SSLContext, groups: str) -> bool:
        return self.SSL_CTX_ctrl(self.ctx_ptr(context), self.SSL_CTRL_SET_GROUPS_LIST, 0,
                                 self.ct.c_char_p(groups.encode())) == 1

    def session_cache(self, context: ssl.SSLContext, mode: int, size: Optional[int],
                      timeout: float, sid_ctx: bytes = b"MAIL") -> None:
        p = self.ctx_ptr(context)
        self.SSL_CTX_ctrl(p, self.SSL_CTRL_SET_SESS_CACHE_MODE, mode, None)
        if size is not None:
            self.SSL_CTX_ctrl(p, self.SSL_CTRL_SET_SESS_CACHE_SIZE, size, None)
        self.SSL_CTX_set_timeout(p, int(timeout))
        self.SSL_CTX_set_session_id_context(p, sid_ctx, len(sid_ctx))

    def shared_cache(self, context: ssl.SSLContext, store: Any, sid_ctx: bytes, timeout: float,
                     tickets: bool) -> None:
        """Sessions of `context` in `store` (tls_cache.SessionStore) as well, shared with every
        process that has it; the cache mode is `session_cache`'s."""
        if self.sessions_error:
            raise RuntimeError(self.sessions_error)
        p = self.ctx_ptr(context)
        self._zones[p] = (store, sid_ctx, float(timeout), tickets)
        weakref.finalize(context, self._zones.pop, p, None)
        self.SSL_CTX_sess_set_new_cb(p, self._new_cb)
        self.SSL_CTX_sess_set_get_cb(p, self._get_cb)
        self.SSL_CTX_sess_set_remove_cb(p, self._remove_cb)

    def _session_key(self, sess):
        """(session id context, session id) of an SSL_SESSION*."""
        ct = self.ct
        n = ct.c_uint(0)
        sid = self.SSL_SESSION_get_id(sess, ct.byref(n))
        sid = ct.string_at(sid, n.value) if sid and 0 < n.value <= 32 else b""
        m = ct.c_uint(0)
        ctx = self.SSL_SESSION_get0_id_context(sess, ct.byref(m))
        return (ct.string_at(ctx, m.value) if ctx and 0 < m.value <= 32 else b""), sid

    def _new_session(self, s, sess):
        """ngx_ssl_new_session: store the DER; 0, OpenSSL keeps its reference."""
        ct = self.ct
        try:
            zone = self._zones.get(self.SSL_get_SSL_CTX(s))
            # TLSv1.3 with tickets resumes by ticket: OpenSSL reports the session anyway
            if zone is None or (zone[3] and self.SSL_version_(s) == self.TLS1_3_VERSION):
                return 0
            n = self.i2d_SSL_SESSION(sess, None)
            if not 0 < n <= 4096:       # NGX_SSL_MAX_SESSION_SIZE
                return 0
            buf = ct.create_string_buffer(n)
            out = ct.c_void_p(ct.addressof(buf))
            if self.i2d_SSL_SESSION(sess, ct.byref(out)) != n:
                return 0
            sid_ctx, sid = self._session_key(sess)
            if sid:
                zone[0].put(sid_ctx, sid, buf.raw, zone[2])
        except BaseException:       # never an exception through OpenSSL: not cached
            pass
        return 0

    def _get_session(self, s, data, length, copy):
        """ngx_ssl_get_cached_session: a new SSL_SESSION* OpenSSL owns (*copy = 0), or NULL."""
        ct = self.ct
        try:
            copy[0] = 0
            zone = self._zones.get(self.SSL_get_SSL_CTX(s))
            if zone is None or not 0 < length <= 32:
                return None
            sid = ct.string_at(data, length)
            der = zone[0].get(zone[1], sid)
            if der is None:
                return None
            buf = ct.create_string_buffer(der, len(der))
            sess = self.d2i_SSL_SESSION(None, ct.byref(ct.c_void_p(ct.addressof(buf))), len(der))
            if sess and self._session_key(sess)[1] != sid:
                self.SSL_SESSION_free(sess)
                return None
            return sess or None
        except BaseException:       # never an exception through OpenSSL: a cache miss
            return None

    def _remove_session(self, ctx, sess):
        """ngx_ssl_remove_session: a session OpenSSL marked not resumable."""
        try:
            zone = self._zones.get(ctx)
            if zone is not None:
                sid_ctx, sid = self._session_key(sess)
                if sid:
                    zone[0].remove(sid_ctx, sid)
        except BaseException:
            pass

    def alpn_strict(self, context: ssl.SSLContext, proto: bytes) -> Tuple[Any, Any]:
        """Select `proto` if offered; a client offering ALPN without it gets a fatal alert."""
        ct = self.ct
        buf = ct.create_string_buffer(proto, len(proto))

        def select_cb(_ssl, out, outlen, inp, inlen, _arg):
            data = ct.string_at(inp, inlen)
            k = 0
            while k < len(data):
                n = data[k]
                if data[k + 1:k + 1 + n] == proto:
                    out[0] = ct.addressof(buf)
                    outlen[0] = len(proto)
                    return 0            # SSL_TLSEXT_ERR_OK
                k += 1 + n
            return 2                    # SSL_TLSEXT_ERR_ALERT_FATAL: no_application_protocol
        cb = self.ALPN_CB(select_cb)
        self.SSL_CTX_set_alpn_select_cb(self.ctx_ptr(context), cb, None)
        return (cb, buf)                # the caller keeps them alive with the context

    def ticket_key(self, context: ssl.SSLContext, key: bytes) -> bool:
        """One 80-byte key (nginx's layout: name, HMAC secret, AES-256 key, which is OpenSSL's
        own) handed to OpenSSL itself (SSL_CTX_set_tlsext_ticket_keys): its tickets are then
        made and read in C, with no callback into Python per handshake.  False if refused."""
        if len(key) != 80:
            return False
        buf = self.ct.create_string_buffer(key, len(key))
        return self.SSL_CTX_ctrl(self.ctx_ptr(context), self.SSL_CTRL_SET_TLSEXT_TICKET_KEYS,
                                 len(key), self.ct.cast(buf, self.ct.c_void_p)) == 1

    def ticket_keys(self, context: ssl.SSLContext, keys: Sequence[bytes]) -> Tuple[Any, Any]:
        """ngx_ssl_session_ticket_keys + ngx_ssl_ticket_key_callback: `keys` (48 or 80 bytes in
        nginx's file layouts) encrypt and decrypt the context's tickets; the first encrypts, all
        decrypt, a ticket under another key (or any in TLSv1.3) is renewed. Returns what the
        caller keeps alive with the context."""
        ct = self.ct
        if self.tickets_error:
            raise RuntimeError(self.tickets_error)
        entries = []                # (name, cipher, aes key, hmac key, EVP_MAC params)
        for raw in keys:
            if len(raw) == 48:      # name, AES-128 key, HMAC secret (nginx's order)
                name, aes, mac, cipher = raw[:16], raw[16:32], raw[32:48], self.EVP_aes_128_cbc()
            elif len(raw) == 80:    # name, HMAC secret, AES-256 key
                name, mac, aes, cipher = raw[:16], raw[16:48], raw[48:80], self.EVP_aes_256_cbc()
            else:
                raise ValueError("a ticket key is 48 or 80 bytes, not %d" % len(raw))
            aes_buf = ct.create_string_buffer(aes, len(aes))
            mac_buf = ct.create_string_buffer(mac, len(mac))
            params = self._mac_params(mac_buf) if self.ticket_evp else None
            entries.append((name, cipher, aes_buf, mac_buf, params))
        if not entries or not all(e[1] for e in entries):
            raise RuntimeError("no ticket keys or no AES cipher")

        def hmac_init(hctx, mac_buf, params):
            if params is not None:
                return self.EVP_MAC_CTX_set_params(hctx, params[0]) == 1
            return self.HMAC_Init_ex(hctx, mac_buf, len(mac_buf), self.EVP_sha256(), None) == 1

        def callback(s, name, iv, ectx, hctx, enc):
            try:
                if enc == 1:
                    kname, cipher, aes, mac, params = entries[0]
                    if self.RAND_bytes(iv, 16) != 1 \
                            or self.EVP_EncryptInit_ex(ectx, cipher, None, aes, iv) != 1 \
                            or not hmac_init(hctx, mac, params):
                        return -1
                    ct.memmove(name, kname, 16)
                    return 1
                got = ct.string_at(name, 16)
                for k, (kname, cipher, aes, mac, params) in enumerate(entries):
                    if kname == got:
                        break
                else:
                    return 0        # unknown key: a full handshake
                if not hmac_init(hctx, mac, params) \
                        or self.EVP_DecryptInit_ex(ectx, cipher, None, aes, iv) != 1:
                    return -1
                return 2 if k or self.SSL_version(s) == self.TLS1_3_VERSION else 1
            except BaseException:   # never an exception through OpenSSL: refuse the ticket
                return -1
        cb = self.TICKET_CB(callback)
        if self.set_ticket_cb(self.ctx_ptr(context), cb) != 1:
            raise RuntimeError("OpenSSL refused the ticket key callback")
        return (cb, entries)

    def _mac_params(self, mac_buf):
        """(OSSL_PARAM[] {"key": the HMAC secret, "digest": "SHA256", end}, the digest name) for
        EVP_MAC_CTX_set_params (OpenSSL 3)."""
        ct = self.ct

        class Param(ct.Structure):
            _fields_ = [("key", ct.c_char_p), ("data_type", ct.c_uint), ("data", ct.c_void_p),
                        ("data_size", ct.c_size_t), ("return_size", ct.c_size_t)]
        unmodified = ct.c_size_t(-1).value          # OSSL_PARAM_UNMODIFIED
        digest = ct.create_string_buffer(b"SHA256")
        params = (Param * 3)()
        params[0] = Param(b"key", 5, ct.addressof(mac_buf), len(mac_buf), unmodified)
        params[1] = Param(b"digest", 4, ct.addressof(digest), 6, unmodified)
        return params, digest       # the digest name must live as long as the array

    def conf_commands(self, context: ssl.SSLContext,
                      commands: Sequence[Tuple[str, str]]) -> Optional[str]:
        """ssl_conf_command: SSL_CONF_cmd() on the context; the first failing name or None."""
        cctx = self.SSL_CONF_CTX_new()
        try:
            # SSL_CONF_FLAG_FILE | SERVER | CERTIFICATE | SHOW_ERRORS, as nginx
            self.SSL_CONF_CTX_set_flags(cctx, 0x2 | 0x8 | 0x20 | 0x10)
            self.SSL_CONF_CTX_set_ssl_ctx(cctx, self.ctx_ptr(context))
            for name, value in commands:
                if self.SSL_CONF_cmd(cctx, name.encode(), value.encode()) <= 0:
                    return name
            if self.SSL_CONF_CTX_finish(cctx) != 1:
                return commands[-1][0] if commands else "?"
            return None
        finally:
            self.SSL_CONF_CTX_free(cctx)

    def verify_result(self, p: int) -> Tuple[int, str]:
        """(code, text) of SSL_get_verify_result() on a validated SSL* (`ssl_ptr`)."""
        rc = self.SSL_get_verify_result(p)
        text = self.X509_verify_cert_error_string(rc) or b"?"
        return rc, text.decode("ascii", "replace")

    def peer_dns(self, p: int) -> Tuple[Optional[str], Optional[str]]:
        """(subject, issuer) of the client certificate in X509_NAME_print_ex RFC 2253 form."""
        cert = self.SSL_get_peer_certificate(p)
        if not cert:
            return None, None
        try:
            return (self._name(self.X509_get_subject_name(cert)),
                    self._name(self.X509_get_issuer_name(cert)))
        finally:
            self.X509_free(cert)

    def _name(self, name):
        if not name:
            return ""
        bio = self.BIO_new(self.BIO_s_mem())
        try:
            if self.X509_NAME_print_ex(bio, name, 0, self.XN_FLAG_RFC2253) < 0:
                return ""
            data = self.ct.c_void_p()
            n = self.BIO_ctrl(bio, self.BIO_CTRL_INFO, 0, self.ct.byref(data))
            return self.ct.string_at(data.value, n).decode("utf-8", "replace") if n > 0 else ""
        finally:
            self.BIO_free(bio)


def _mode_bits(mode):
    return {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}[mode]


_native = None
_native_error = None
_native_lock = threading.Lock()


def native() -> Optional[Native]:
    """The Native helper, or None (then `native_error()` says why)."""
    global _native, _native_error
    with _native_lock:
        if _native is None and _native_error is None:
            if os.environ.get(ENV_OFF, "") not in ("", "0"):
                _native_error = "turned off by %s=%s" % (ENV_OFF, os.environ[ENV_OFF])
                return None
            try:
                _native = Native()
            except Exception as e:   # not CPython, other layout, symbols missing, no /proc
                _native_error = "%s: %s" % (type(e).__name__, e)
        return _native


def native_error() -> Optional[str]:
    native()
    return _native_error
