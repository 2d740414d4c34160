"""What the tests share, one job per module (imported as `tests.support.<module>`; the
repository root is on sys.path through pyproject.toml's `pythonpath`):

  common       REPO, CRLF, b64, wait_for, RecordingLog, fail_on_errors
  process      free_port, ini, server_block, ProxyProcess (the proxy as a subprocess), Setup,
               SharedProxy (one proxy per module, a block per configuration), SessionLog
  auth         AuthServer (recording auth_http service), auth_ok, auth_fail, Delay
  backends     ScriptedBackend, BackendConn, script
  mailbackends Pop3Backend, ImapBackend, SmtpBackend, the big message
  dns          DnsServer and the `dns` fixture
  clients      LineClient
  tls          client-side TLS: client_ctx, TLSLines
  certs        the test PKI (`pki`, `certs` fixtures) and `issue`
  relaying     the relay's plumbing (`lis`, `relay`, `ctxs` fixtures)
  proxyproto   PROXY v2 headers by hand
  realservers, realmail   real Dovecot, Postfix, HAProxy, nginx (tests/integration)

The fakes (auth service, backends, DNS server) record unexpected errors; their fixtures fail
the test on them in teardown.
"""
