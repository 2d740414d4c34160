import socket
import threading
import time

import pytest

from mailproxy import auth_http
from mailproxy.config import AuthURL
from mailproxy.auth_http import (AuthHttpError, AuthRequest, AuthResult,
                                 build_request, escape, parse_response, query)


def make_url(port=9000, host='127.0.0.1', uri='/auth', host_header=None, unix=None):
    if unix:
        return AuthURL(text='unix:' + unix + ':' + uri, host='', port=0, uri=uri,
                       unix=unix, host_header=host_header or 'localhost',
                       family=socket.AF_UNIX, sockaddr=None)
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    sockaddr = (host, port, 0, 0) if family == socket.AF_INET6 else (host, port)
    return AuthURL(text='http://%s:%d%s' % (host, port, uri), host=host, port=port,
                   uri=uri, unix=None, host_header=host_header or host,
                   family=family, sockaddr=sockaddr)


def plain_req(**kw):
    args = dict(method='plain', user=b'alice', passwd=b'secret', protocol='pop3',
                attempt=1, client_ip='192.0.2.7')
    args.update(kw)
    return AuthRequest(**args)


# --- build_request -----------------------------------------------------------

def test_build_plain():
    url = make_url(9000, host_header='auth.example.com')
    assert build_request(url, plain_req(user=b'alice smith', passwd=b'p w ')) == (
        b'GET /auth HTTP/1.0\r\n'
        b'Host: auth.example.com\r\n'
        b'Auth-Method: plain\r\n'
        b'Auth-User: alice%20smith\r\n'
        b'Auth-Pass: p%20w%20\r\n'
        b'Auth-Protocol: pop3\r\n'
        b'Auth-Login-Attempt: 1\r\n'
        b'Client-IP: 192.0.2.7\r\n'
        b'\r\n')


def test_build_apop_with_salt():
    salt = b'<238188073.1163692009@mail.example.com>'
    req = plain_req(method='apop', passwd=b'c4c9334bac560ecc979e58001b3e22fb', salt=salt,
                    attempt=3)
    assert build_request(make_url(), req) == (
        b'GET /auth HTTP/1.0\r\n'
        b'Host: 127.0.0.1\r\n'
        b'Auth-Method: apop\r\n'
        b'Auth-User: alice\r\n'
        b'Auth-Pass: c4c9334bac560ecc979e58001b3e22fb\r\n'
        b'Auth-Salt: <238188073.1163692009@mail.example.com>\r\n'
        b'Auth-Protocol: pop3\r\n'
        b'Auth-Login-Attempt: 3\r\n'
        b'Client-IP: 192.0.2.7\r\n'
        b'\r\n')
    # a salt stored with its CRLF gives the same request
    req.salt = salt + b'\r\n'
    assert b'Auth-Salt: ' + salt + b'\r\nAuth-Protocol' in build_request(make_url(), req)


def test_build_cram_md5_imap():
    req = plain_req(method='cram-md5', protocol='imap', passwd=b'b913a602c7eda7a495b4e6e7334d3890',
                    salt=b'<1.2@h>', client_ip='2001:db8::1')
    assert build_request(make_url(), req) == (
        b'GET /auth HTTP/1.0\r\n'
        b'Host: 127.0.0.1\r\n'
        b'Auth-Method: cram-md5\r\n'
        b'Auth-User: alice\r\n'
        b'Auth-Pass: b913a602c7eda7a495b4e6e7334d3890\r\n'
        b'Auth-Salt: <1.2@h>\r\n'
        b'Auth-Protocol: imap\r\n'
        b'Auth-Login-Attempt: 1\r\n'
        b'Client-IP: 2001:db8::1\r\n'
        b'\r\n')


def test_build_external_no_salt():
    # a POP3 greeting salt exists, but EXTERNAL does not send it (1.29.1+)
    req = plain_req(method='external', passwd=b'', salt=b'<1.2@h>')
    data = build_request(make_url(), req)
    assert b'Auth-Salt' not in data
    assert b'Auth-Method: external\r\nAuth-User: alice\r\nAuth-Pass: \r\nAuth-Protocol: pop3\r\n' in data
    # plain never sends the salt either
    assert b'Auth-Salt' not in build_request(make_url(), plain_req(salt=b'<1.2@h>'))


def test_build_smtp_none():
    req = AuthRequest(method='none', user=b'', passwd=b'', protocol='smtp', attempt=1,
                      client_ip='192.0.2.7', client_host='[UNAVAILABLE]',
                      smtp_helo=b'client.example', smtp_from=b'MAIL FROM:<a@b> SIZE=100',
                      smtp_to=b'RCPT TO:<c@d>  NOTIFY=NEVER')
    assert build_request(make_url(), req) == (
        b'GET /auth HTTP/1.0\r\n'
        b'Host: 127.0.0.1\r\n'
        b'Auth-Method: none\r\n'
        b'Auth-User: \r\n'
        b'Auth-Pass: \r\n'
        b'Auth-Protocol: smtp\r\n'
        b'Auth-Login-Attempt: 1\r\n'
        b'Client-IP: 192.0.2.7\r\n'
        b'Client-Host: [UNAVAILABLE]\r\n'
        b'Auth-SMTP-Helo: client.example\r\n'
        b'Auth-SMTP-From: MAIL FROM:<a@b> SIZE=100\r\n'
        b'Auth-SMTP-To: RCPT TO:<c@d>  NOTIFY=NEVER\r\n'
        b'\r\n')
    # no HELO yet: empty value
    req.smtp_helo = None
    assert b'Auth-SMTP-Helo: \r\n' in build_request(make_url(), req)
    # SMTP headers only for method none
    req.method = 'plain'
    assert b'Auth-SMTP' not in build_request(make_url(), req)


def test_build_proxy_ssl_and_extra_headers():
    pem = b'-----BEGIN CERTIFICATE-----\nMIIB+%x\n-----END CERTIFICATE-----\n'
    req = plain_req(
        protocol='smtp', client_host='client.example',
        proxy=('203.0.113.9', 51234, '198.51.100.1', 25),
        ssl=[('Auth-SSL', 'on'), ('Auth-SSL-Protocol', 'TLSv1.3'),
             ('Auth-SSL-Cipher', 'TLS_AES_256_GCM_SHA384'), ('Auth-SSL-Verify', 'SUCCESS'),
             ('Auth-SSL-Subject', 'O=Client Org,CN=client.test'), ('Auth-SSL-Cert', pem)],
        headers=[('X-Auth-Key', 'secret key'), ('X-Other', '1')])
    assert build_request(make_url(uri='/mail/auth?x=1'), req) == (
        b'GET /mail/auth?x=1 HTTP/1.0\r\n'
        b'Host: 127.0.0.1\r\n'
        b'Auth-Method: plain\r\n'
        b'Auth-User: alice\r\n'
        b'Auth-Pass: secret\r\n'
        b'Auth-Protocol: smtp\r\n'
        b'Auth-Login-Attempt: 1\r\n'
        b'Client-IP: 192.0.2.7\r\n'
        b'Client-Host: client.example\r\n'
        b'Proxy-Protocol-Addr: 203.0.113.9\r\n'
        b'Proxy-Protocol-Port: 51234\r\n'
        b'Proxy-Protocol-Server-Addr: 198.51.100.1\r\n'
        b'Proxy-Protocol-Server-Port: 25\r\n'
        b'Auth-SSL: on\r\n'
        b'Auth-SSL-Protocol: TLSv1.3\r\n'
        b'Auth-SSL-Cipher: TLS_AES_256_GCM_SHA384\r\n'
        b'Auth-SSL-Verify: SUCCESS\r\n'
        b'Auth-SSL-Subject: O=Client Org,CN=client.test\r\n'
        b'Auth-SSL-Cert: -----BEGIN%20CERTIFICATE-----%0AMIIB+%25x%0A-----END%20CERTIFICATE-----%0A\r\n'
        b'X-Auth-Key: secret key\r\n'
        b'X-Other: 1\r\n'
        b'\r\n')


def test_build_unix_host():
    url = make_url(unix='/run/auth.sock', uri='/a')
    assert build_request(url, plain_req()).startswith(b'GET /a HTTP/1.0\r\nHost: localhost\r\n')


def test_escape():
    assert escape(b'alice smith') == b'alice%20smith'
    assert escape(b'p w ') == b'p%20w%20'
    assert escape(b'100%') == b'100%25'
    assert escape(bytes(range(0x21))) == b''.join(b'%%%02X' % c for c in range(0x21))
    raw = b'+"\x7f\x80\xff~!:;=&?/\\'
    assert escape(raw) == raw
    assert escape(b'\x1f\x0a') == b'%1F%0A'


def test_build_no_header_injection():
    evil = b'x\r\nAuth-Method: none\r\n\x00'
    req = AuthRequest(method='none', user=evil, passwd=evil, protocol='smtp', attempt=2,
                      client_ip='1.2.3.4', client_host='h\r\nX-Evil: 1',
                      smtp_helo=evil, smtp_from=evil, smtp_to=evil,
                      ssl=[('Auth-SSL-Subject', 'CN=a\r\nX-Evil: 2'), ('Auth-SSL-Cert', evil)],
                      headers=[('X-Key', 'v\nX-Evil: 3')])
    data = build_request(make_url(), req)
    head, sep, rest = data.partition(b'\r\n\r\n')
    assert rest == b''
    lines = head.split(b'\r\n')
    assert all(b'\n' not in l and b'\r' not in l and b'\x00' not in l for l in lines)
    assert not any(l.startswith(b'X-Evil') or l.startswith(b'Auth-Method: none\\') for l in lines)
    assert sum(l.startswith(b'Auth-Method:') for l in lines) == 1
    assert b'Auth-User: x%0D%0AAuth-Method:%20none%0D%0A%00' in lines
    assert b'Client-Host: h%0D%0AX-Evil: 1' in lines


# --- parse_response ----------------------------------------------------------

PEER = '127.0.0.1:9000'


def parse(text, req=None):
    return parse_response(text, req or plain_req(), PEER)


def err(text, req=None):
    with pytest.raises(AuthHttpError) as exc:
        parse(text, req)
    return str(exc.value)


OK = b'Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 110\r\n\r\n'


def test_parse_ok_with_and_without_status_line():
    for text in (OK, b'HTTP/1.0 200 OK\r\n' + OK, b'HTTP/1.1 500 Internal Server Error\r\n' + OK,
                 OK.replace(b'\r\n', b'\n'), b'HTTP/1.0 200 OK\n' + OK.replace(b'\r\n', b'\n')):
        r = parse(text)
        assert r == AuthResult('OK', server='127.0.0.1', port=110, peer=PEER)


def test_parse_overrides_and_case_insensitive_names():
    r = parse(b'auth-status: OK\r\nAUTH-SERVER:   ::1  \r\nauth-PORT: 0143\r\n'
              b'Auth-User:  bob  smith \r\nAuth-Pass: \tpw\t\r\nX-Other: foo\r\n\r\nbody ignored')
    assert (r.status, r.server, r.port, r.user, r.passwd) == ('OK', '::1', 143, b'bob  smith', b'\tpw\t')


def test_parse_status_is_case_sensitive():
    r = parse(b'Auth-Status: ok\r\n\r\n')
    assert (r.status, r.message) == ('FAIL', b'ok')


def test_parse_failure():
    r = parse(b'HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\n'
              b'Auth-Wait: 3\r\nAuth-Error-Code: 535 5.7.8\r\n\r\n')
    assert r == AuthResult('FAIL', message=b'Invalid login or password', wait=3,
                           error_code='535 5.7.8', peer=PEER)
    r = parse(b'Auth-Status: Temporary problem\r\n\r\n')
    assert (r.status, r.message, r.wait, r.error_code) == ('FAIL', b'Temporary problem', None, None)


def test_parse_failure_wins_over_ok():
    for text in (b'Auth-Status: OK\r\nAuth-Status: Denied\r\n' + OK,
                 b'Auth-Status: Denied\r\n' + OK,
                 b'Auth-Status: WAIT\r\nAuth-Status: Denied\r\n\r\n'):
        r = parse(text)
        assert (r.status, r.message) == ('FAIL', b'Denied')


def test_parse_empty_status_is_failure():
    assert parse(b'Auth-Status:\r\n\r\n').status == 'FAIL'


def test_parse_wait():
    r = parse(b'Auth-Status: WAIT\r\nAuth-Wait: 2\r\n\r\n')
    assert (r.status, r.wait) == ('WAIT', 2)
    assert parse(b'Auth-Status: WAIT\r\n\r\n').wait is None


def test_parse_auth_wait_integer_only():
    for value in (b'x', b'-1', b'1.5', b'', b'99999999999999999999'):
        r = parse(b'Auth-Status: No\r\nAuth-Wait: ' + value + b'\r\n\r\n')
        assert r.wait is None, value
    # invalid value leaves the earlier valid one
    r = parse(b'Auth-Status: No\r\nAuth-Wait: 4\r\nAuth-Wait: x\r\n\r\n')
    assert r.wait == 4


@pytest.mark.parametrize('status', [b'No', b'WAIT'])
def test_parse_auth_wait_clamped(status):
    # a huge value once reached Event.wait() and raised OverflowError
    for value in (b'3601', b'99999999999', b'9223372036854775807'):
        r = parse(b'Auth-Status: ' + status + b'\r\nAuth-Wait: ' + value + b'\r\n\r\n')
        assert r.wait == 3600 == auth_http.MAX_AUTH_WAIT, value
    assert parse(b'Auth-Status: No\r\nAuth-Wait: 3600\r\n\r\n').wait == 3600


def test_parse_missing_status_is_ok():
    r = parse(b'Auth-Server: 10.0.0.1\r\nAuth-Port: 110\r\n\r\n')
    assert (r.status, r.server, r.port) == ('OK', '10.0.0.1', 110)


def test_parse_missing_server_or_port():
    msg = 'auth http server 127.0.0.1:9000 did not send server or port'
    assert err(b'Auth-Status: OK\r\nAuth-Server: 1.2.3.4\r\n\r\n') == msg
    assert err(b'Auth-Status: OK\r\nAuth-Port: 110\r\n\r\n') == msg
    assert err(b'Auth-Status: OK\r\nAuth-Server:\r\nAuth-Port: 110\r\n\r\n') == msg
    assert err(b'\r\n') == msg


def test_parse_line_without_colon_is_empty_value():
    assert err(b'Auth-Server: 1.2.3.4\r\nAuth-Port\r\n\r\n') == \
        'auth http server 127.0.0.1:9000 did not send server or port'
    r = parse(b'Auth-Status\r\n\r\n')      # empty status text = failure
    assert (r.status, r.message) == ('FAIL', b'')


def test_parse_invalid_header():
    msg = 'auth http server 127.0.0.1:9000 sent invalid header in response'
    for text in (b'Auth_Status: OK\r\n\r\n', b'Auth-Status : OK\r\n\r\n', b'-Auth: x\r\n\r\n',
                 b': x\r\n\r\n', b'Auth-Status: O\rK\r\n\r\n', b'\rx\r\n',
                 b'HTTP/1.0 200 OK\r\n' + OK[:-2] + b'Bad Header: 1\r\n\r\n',
                 b'Auth-Status: OK\r\nAuth_X'):       # reported even before the header ends
        assert err(text) == msg, text


def test_parse_invalid_status_line():
    assert err(b'HTTP/1.0 200 OK\rAuth-Status: OK\r\n\r\n') == \
        'auth http server 127.0.0.1:9000 sent invalid response'
    # not "HTTP/": parsed as headers from the first byte
    assert err(b'HTTP 200 OK\r\n\r\n') == \
        'auth http server 127.0.0.1:9000 sent invalid header in response'


def test_parse_incomplete_and_too_large():
    assert 'closed connection before the end of the header' in err(OK[:-2])
    assert 'closed connection before the end of the header' in err(b'HTTP/1.0 200')
    assert 'closed connection before the end of the header' in err(b'')
    big = b'HTTP/1.0 200 OK\r\nX-Pad: ' + b'a' * 1100 + b'\r\n' + OK
    assert err(big) == 'auth http server 127.0.0.1:9000 sent too large header (more than 1024 bytes)'
    # exactly 1024 bytes including the empty line is fine
    pad = b'X-Pad: '
    text = pad + b'a' * (1024 - len(pad) - 2 - len(OK)) + b'\r\n' + OK
    assert len(text) == 1024
    assert parse(text + b'body').status == 'OK'


def test_parse_server_address():
    def srv(value):
        return parse(b'Auth-Server: ' + value + b'\r\nAuth-Port: 25\r\n\r\n').server
    assert srv(b'10.1.2.3') == '10.1.2.3'
    assert srv(b'010.001.2.3') == '10.1.2.3'        # decimal, as nginx reads it
    assert srv(b'::ffff:10.1.2.3') == '::ffff:10.1.2.3'
    assert srv(b'2001:db8::25') == '2001:db8::25'
    assert srv(b'mail-1.example.com') == 'mail-1.example.com'
    assert srv(b'backend') == 'backend'
    assert srv(b'mail.example.com.') == 'mail.example.com.'
    assert srv(b'1mail.example') == '1mail.example'
    assert srv(b'a.') == 'a.'
    assert srv(b'mx1.a-b.example') == 'mx1.a-b.example'
    for bad in (b'1.2.3.256', b'1.2.3', b'[::1]', b'fe80::1%eth0', b'mail_1.example', b'a..b',
                b'-a.example', b'host:25', b'1.2.3.4:25', b'a b', b'\xc3\xa9.example', b'.',
                b'a' * 64 + b'.example', b'127.1', b'0x7f.0.0.1', b'1.2.3.4.', b'mail.1',
                b'host.0x10', b'..', b'1.2.3.4.5'):
        assert err(b'Auth-Server: ' + bad + b'\r\nAuth-Port: 25\r\n\r\n') == \
            'auth http server 127.0.0.1:9000 sent invalid server address:"%s"' % bad.decode('latin-1'), bad


def test_parse_invalid_values_are_cut_and_escaped_in_the_log():
    for name in (b'Auth-Server: ', b'Auth-Port: ', b'Auth-SSL-Backend: '):
        other = b'Auth-Port: 25\r\n' if name == b'Auth-Server: ' else b'Auth-Server: 10.0.0.1\r\n'
        text = err(name + b'\x1b[2J' + b'x' * 900 + b'\r\n' + other + b'\r\n')
        assert '\x1b' not in text and '\\x1b[2J' in text, name
        assert len(text) < 400 and text.endswith('..."'), name


def test_parse_port():
    for bad in (b'0', b'65536', b'-1', b'+25', b'x', b'2 5'):
        assert err(b'Auth-Server: 1.2.3.4\r\nAuth-Port: ' + bad + b'\r\n\r\n') == \
            'auth http server 127.0.0.1:9000 sent invalid server port:"%s"' % bad.decode(), bad
    assert parse(b'Auth-Server: 1.2.3.4\r\nAuth-Port: 65535\r\n\r\n').port == 65535
    assert parse(b'Auth-Server: 1.2.3.4\r\nAuth-Port: 1\r\n\r\n').port == 1


def test_parse_address_checked_before_port():
    assert 'invalid server address' in err(b'Auth-Server: x_y\r\nAuth-Port: 0\r\n\r\n')


def test_parse_password_required():
    msg = 'auth http server 127.0.0.1:9000 did not send password'
    for method in ('apop', 'cram-md5', 'external'):
        for proto in ('pop3', 'imap'):
            req = plain_req(method=method, protocol=proto)
            assert err(OK, req) == msg
            r = parse(OK[:-2] + b'Auth-Pass: real\r\n\r\n', req)
            assert r.passwd == b'real'
            # an empty Auth-Pass is still a password
            assert parse(OK[:-2] + b'Auth-Pass:\r\n\r\n', req).passwd == b''
        assert parse(OK, plain_req(method=method, protocol='smtp')).status == 'OK'
    assert parse(OK, plain_req(method='plain', protocol='imap')).passwd is None


# --- query() against scripted servers ---------------------------------------

class Server:
    """Accepts one connection per scripted action, records each request."""

    def __init__(self, actions, unix_path=None):
        self.actions = list(actions)
        self.requests = []
        self.stop = threading.Event()
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_path)
            self.url = make_url(unix=unix_path)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(('127.0.0.1', 0))
            self.url = make_url(self.sock.getsockname()[1])
        self.sock.listen(8)
        self.sock.settimeout(5)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        for action in self.actions:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b''
                while b'\r\n\r\n' not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                try:
                    if action == 'hang':
                        self.stop.wait(5)
                    elif isinstance(action, list):    # send in pieces
                        for piece in action:
                            conn.sendall(piece)
                            time.sleep(0.02)
                    else:
                        conn.sendall(action)
                except OSError:                       # the client may close first
                    pass

    def close(self):
        self.stop.set()
        try:        # closing alone leaves accept() blocked until its timeout; shutdown wakes it
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def server():
    servers = []

    def start(*actions, unix_path=None):
        s = Server(actions, unix_path=unix_path)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.close()


def test_query_ok(server):
    s = server(b'HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n'
               b'Auth-Port: 110\r\n\r\n' + b'x' * 100000)
    r = query(s.url, plain_req(), 2)
    assert r.status == 'OK' and (r.server, r.port) == ('127.0.0.1', 110)
    assert r.peer == '127.0.0.1:%d' % s.url.port
    assert s.requests == [build_request(s.url, plain_req())]


def test_query_response_in_pieces(server):
    s = server([b'HTTP/1.0 200 OK\r', b'\nAuth-Status: OK\r\nAuth-Serv', b'er: 10.0.0.1\r\n',
                b'Auth-Port: 25\r', b'\n\r', b'\n'])
    r = query(s.url, plain_req(), 2)
    assert (r.status, r.server, r.port) == ('OK', '10.0.0.1', 25)


def test_query_failure_text(server):
    s = server(b'HTTP/1.0 200 OK\r\nAuth-Status: Invalid login\r\n\r\n')
    r = query(s.url, plain_req(), 2)
    assert (r.status, r.message, r.wait) == ('FAIL', b'Invalid login', None)


def test_query_failure_with_wait(server):
    s = server(b'Auth-Status: Try later\r\nAuth-Wait: 3\r\nAuth-Error-Code: 451 4.3.0\r\n\r\n')
    r = query(s.url, plain_req(protocol='smtp'), 2)
    assert (r.status, r.message, r.wait, r.error_code) == ('FAIL', b'Try later', 3, '451 4.3.0')
    assert len(s.requests) == 1


def test_query_wait_then_ok(server):
    s = server(b'HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 1\r\n\r\n',
               b'HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\n\r\n',
               b'HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.2\r\nAuth-Port: 143\r\n\r\n')
    slept = []
    req = plain_req(attempt=4, protocol='imap')
    r = query(s.url, req, 2, sleep=slept.append)
    assert (r.status, r.server, r.port) == ('OK', '127.0.0.2', 143)
    assert slept == [1, 0]
    assert len(s.requests) == 3
    assert s.requests[0] == s.requests[1] == s.requests[2] == build_request(s.url, req)
    assert b'Auth-Login-Attempt: 4\r\n' in s.requests[0]


def test_query_wait_really_sleeps(server):
    s = server(b'Auth-Status: WAIT\r\nAuth-Wait: 1\r\n\r\n',
               b'Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 1\r\n\r\n')
    t = time.monotonic()
    assert query(s.url, plain_req(), 2).status == 'OK'
    assert time.monotonic() - t >= 0.95


def test_query_wait_loop_bounded(server):
    s = server(*[b'Auth-Status: WAIT\r\n\r\n'] * 3)
    with pytest.raises(AuthHttpError) as exc:
        query(s.url, plain_req(), 2, max_rounds=3)
    assert 'WAIT' in str(exc.value)
    assert len(s.requests) == 3


@pytest.mark.parametrize('wait', [b'', b'Auth-Wait: 1\r\n', b'Auth-Wait: 99999999999\r\n'])
def test_query_wait_stops_when_sleep_is_interrupted(server, wait):
    # during shutdown the Event's wait returns at once: the loop must stop, not ask again
    s = server(*[b'Auth-Status: WAIT\r\n' + wait + b'\r\n'] * 3)
    stopping = threading.Event()
    stopping.set()
    t = time.monotonic()
    with pytest.raises(AuthHttpError) as exc:
        query(s.url, plain_req(), 2, sleep=stopping.wait)
    assert 'shutting down' in str(exc.value)
    assert len(s.requests) == 1
    assert time.monotonic() - t < 1


def test_query_500_with_ok(server):
    s = server(b'HTTP/1.0 500 Internal Server Error\r\nAuth-Status: OK\r\n'
               b'Auth-Server: 127.0.0.1\r\nAuth-Port: 110\r\n\r\n')
    assert query(s.url, plain_req(), 2).status == 'OK'


def test_query_bad_header_name(server):
    s = server(b'HTTP/1.0 200 OK\r\nAuth_Status: OK\r\n\r\n')
    with pytest.raises(AuthHttpError) as exc:
        query(s.url, plain_req(), 2)
    assert str(exc.value) == 'auth http server 127.0.0.1:%d sent invalid header in response' % s.url.port


def test_query_header_too_large(server):
    s = server(b'HTTP/1.0 200 OK\r\nX-Pad: ' + b'a' * 1100 + b'\r\n' + OK)
    with pytest.raises(AuthHttpError) as exc:
        query(s.url, plain_req(), 2)
    assert 'too large header' in str(exc.value)


def test_query_server_closes_early(server):
    s = server(b'HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n')
    with pytest.raises(AuthHttpError) as exc:
        query(s.url, plain_req(), 2)
    assert str(exc.value) == ('auth http server 127.0.0.1:%d closed connection before the end '
                              'of the header' % s.url.port)


def test_query_connection_refused():
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(AuthHttpError) as exc:
        query(make_url(port), plain_req(), 2)
    assert str(exc.value) == 'connect() to 127.0.0.1:%d failed (111: Connection refused)' % port
    assert exc.value.errno == 111


def test_query_timeout(server):
    s = server('hang')
    t = time.monotonic()
    with pytest.raises(AuthHttpError) as exc:
        query(s.url, plain_req(), 0.3)
    elapsed = time.monotonic() - t
    assert str(exc.value) == ('auth http server 127.0.0.1:%d timed out (110: Connection timed out)'
                              % s.url.port)
    assert exc.value.errno == 110
    assert 0.25 <= elapsed < 1.5


def test_query_timeout_is_overall(server):
    # a server trickling bytes cannot extend the deadline
    s = server([b'HTTP/1.0 200 OK\r\n'] + [b'X-A: 1\r\n'] * 40)
    t = time.monotonic()
    with pytest.raises(AuthHttpError) as exc:
        query(s.url, plain_req(), 0.3)
    assert 'timed out' in str(exc.value)
    assert time.monotonic() - t < 0.7


def test_query_hostname_server(server):
    s = server(b'Auth-Status: OK\r\nAuth-Server: imap.backend.internal\r\nAuth-Port: 993\r\n\r\n')
    r = query(s.url, plain_req(), 2)
    assert (r.server, r.port) == ('imap.backend.internal', 993)


def test_query_bad_port(server):
    s = server(b'Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 70000\r\n\r\n')
    with pytest.raises(AuthHttpError) as exc:
        query(s.url, plain_req(), 2)
    assert str(exc.value) == ('auth http server 127.0.0.1:%d sent invalid server port:"70000"'
                              % s.url.port)


def test_query_unix(server, tmp_path):
    path = str(tmp_path / 'auth.sock')
    s = server(b'HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n'
               b'Auth-Port: 110\r\nAuth-Pass: real\r\n\r\n', unix_path=path)
    r = query(s.url, plain_req(method='apop', salt=b'<1.2@h>'), 2)
    assert (r.status, r.passwd, r.peer) == ('OK', b'real', 'unix:' + path)
    assert s.requests[0].startswith(b'GET /auth HTTP/1.0\r\nHost: localhost\r\n')


def test_query_unix_missing(tmp_path):
    path = str(tmp_path / 'none.sock')
    with pytest.raises(AuthHttpError) as exc:
        query(make_url(unix=path), plain_req(), 1)
    assert str(exc.value) == 'connect() to unix:%s failed (2: No such file or directory)' % path


def test_query_ipv6(server):
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.bind(('::1', 0))
    except OSError:
        pytest.skip('no IPv6 loopback')
    sock.listen(1)
    url = make_url(sock.getsockname()[1], host='::1')

    def serve():
        conn, _ = sock.accept()
        with conn:
            data = b''
            while b'\r\n\r\n' not in data:
                data += conn.recv(4096)
            conn.sendall(b'Auth-Status: OK\r\nAuth-Server: ::1\r\nAuth-Port: 110\r\n\r\n')
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    r = query(url, plain_req(), 2)
    t.join(2)
    sock.close()
    assert (r.server, r.peer) == ('::1', '[::1]:%d' % url.port)


def test_query_threads(server):
    n = 20
    s = server(*[OK] * n)
    results = []

    def one(i):
        results.append(query(s.url, plain_req(user=b'u%d' % i), 5))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == n and all(r.status == 'OK' for r in results)
    assert sorted(s.requests) == sorted(build_request(s.url, plain_req(user=b'u%d' % i))
                                        for i in range(n))


def test_peer_name():
    assert auth_http.peer_name(make_url(80, host='10.0.0.1')) == '10.0.0.1:80'
    assert auth_http.peer_name(make_url(80, host='2001:db8::1')) == '[2001:db8::1]:80'
    assert auth_http.peer_name(make_url(unix='/tmp/a.sock')) == 'unix:/tmp/a.sock'
