import base64
import re
import time

import pytest

from mailproxy import sasl
from mailproxy.sasl import SaslError


def b64(data):
    return base64.b64encode(data)


def raises(fn, arg, message):
    with pytest.raises(SaslError) as exc:
        fn(arg)
    assert str(exc.value) == message


# --- base64 as nginx decodes it ---------------------------------------------

@pytest.mark.parametrize('text, expected', [
    (b'', b''),
    (b'YQ==', b'a'),
    (b'YQ=', b'a'),
    (b'YQ', b'a'),                 # padding optional
    (b'YWI=', b'ab'),
    (b'YWI', b'ab'),
    (b'YWJj', b'abc'),
    (b'YQ==garbage!', b'a'),       # nginx ignores what follows the first '='
    (b'YR==', b'a'),               # non-zero trailing bits ignored
    (b'+/+/', b'\xfb\xff\xbf'),
    (b'=', b''),
])
def test_decode_base64_good(text, expected):
    assert sasl.decode_base64(text) == expected


@pytest.mark.parametrize('text', [
    b'*', b'Y', b'YWJjZ', b'YW J', b'YW\tJ', b'YW-_', b'YQ\r\n', b'\x00', b'YWJj\xff', b'YW.j',
])
def test_decode_base64_bad(text):
    assert sasl.decode_base64(text) is None


# --- PLAIN -------------------------------------------------------------------

def test_plain_good():
    assert sasl.decode_plain(b64(b'\x00alice\x00secret')) == (b'alice', b'secret')
    assert sasl.decode_plain(b64(b'authz\x00alice\x00s e c ')) == (b'alice', b's e c ')
    assert sasl.decode_plain(b64(b'\x00\x00')) == (b'', b'')
    assert sasl.decode_plain(b64(b'\x00alice\x00')) == (b'alice', b'')
    assert sasl.decode_plain(b64(b'\x00al\xc3\xafce\x00p%w')) == (b'al\xc3\xafce', b'p%w')
    # authzid may hold anything: it is dropped
    assert sasl.decode_plain(b64(b'x\r\ny\x00u\x00p')) == (b'u', b'p')


def test_plain_bad():
    raises(sasl.decode_plain, b'*', 'client sent invalid base64 encoding in AUTH PLAIN command')
    raises(sasl.decode_plain, b'AGFs*WNl', 'client sent invalid base64 encoding in AUTH PLAIN command')
    raises(sasl.decode_plain, b'', 'client sent invalid login in AUTH PLAIN command')
    raises(sasl.decode_plain, b64(b'alice'), 'client sent invalid login in AUTH PLAIN command')
    raises(sasl.decode_plain, b64(b'alice\x00'), 'client sent invalid login in AUTH PLAIN command')
    raises(sasl.decode_plain, b64(b'\x00alice'), 'client sent invalid password in AUTH PLAIN command')


@pytest.mark.parametrize('login', [b'al\rice', b'al\nice', b'alice\r\nQUIT'])
def test_plain_login_injection(login):
    raises(sasl.decode_plain, b64(b'\x00' + login + b'\x00pw'),
           'client sent invalid login in AUTH PLAIN command')


@pytest.mark.parametrize('password', [b'p\rw', b'p\nw', b'pw\r\nRSET', b'p\x00w', b'pw\x00'])
def test_plain_password_injection(password):
    raises(sasl.decode_plain, b64(b'\x00alice\x00' + password),
           'client sent invalid password in AUTH PLAIN command')


# --- LOGIN -------------------------------------------------------------------

def test_login_good():
    assert sasl.decode_login_username(b64(b'alice smith')) == b'alice smith'
    assert sasl.decode_login_username(b'') == b''
    assert sasl.decode_login_password(b64(b'p a s s')) == b'p a s s'
    assert sasl.decode_login_password(b'') == b''


def test_login_bad():
    msg = 'client sent invalid base64 encoding in AUTH LOGIN command'
    raises(sasl.decode_login_username, b'*', msg)
    raises(sasl.decode_login_password, b'*', msg)
    raises(sasl.decode_login_username, b'YWJjZ', msg)
    raises(sasl.decode_login_password, b'a b', msg)
    for bad in (b'a\rb', b'a\nb', b'a\x00b', b'\r\n'):
        raises(sasl.decode_login_username, b64(bad), 'client sent invalid login in AUTH LOGIN command')
        raises(sasl.decode_login_password, b64(bad), 'client sent invalid password in AUTH LOGIN command')


# --- CRAM-MD5 ----------------------------------------------------------------

DIGEST = b'b913a602c7eda7a495b4e6e7334d3890'


def test_cram_md5_good():
    assert sasl.decode_cram_md5(b64(b'tim ' + DIGEST)) == (b'tim', DIGEST)
    # digest is everything after the FIRST space, not checked for hex
    assert sasl.decode_cram_md5(b64(b'tim ' + b'x y' + b'z' * 29)) == (b'tim', b'x y' + b'z' * 29)
    assert sasl.decode_cram_md5(b64(b' ' + DIGEST)) == (b'', DIGEST)


def test_cram_md5_bad():
    hash_msg = 'client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command'
    raises(sasl.decode_cram_md5, b'*', 'client sent invalid base64 encoding in AUTH CRAM-MD5 command')
    raises(sasl.decode_cram_md5, b'', hash_msg)
    raises(sasl.decode_cram_md5, b64(b'tim' + DIGEST), hash_msg)
    raises(sasl.decode_cram_md5, b64(b'tim ' + DIGEST[:31]), hash_msg)
    raises(sasl.decode_cram_md5, b64(b'tim ' + DIGEST + b'0'), hash_msg)
    raises(sasl.decode_cram_md5, b64(b'tim ' + DIGEST[:30] + b'\r\n'), hash_msg)
    raises(sasl.decode_cram_md5, b64(b'tim ' + DIGEST[:31] + b'\x00'), hash_msg)
    raises(sasl.decode_cram_md5, b64(b't\r\nim ' + DIGEST), 'client sent invalid login in AUTH CRAM-MD5 command')
    raises(sasl.decode_cram_md5, b64(b't\x00im ' + DIGEST), 'client sent invalid login in AUTH CRAM-MD5 command')


# --- EXTERNAL ----------------------------------------------------------------

def test_external():
    assert sasl.decode_external(b64(b'alice@example.com')) == b'alice@example.com'
    assert sasl.decode_external(b'') == b''
    raises(sasl.decode_external, b'*', 'client sent invalid base64 encoding in AUTH EXTERNAL command')
    raises(sasl.decode_external, b'Y', 'client sent invalid base64 encoding in AUTH EXTERNAL command')
    for bad in (b'a\rb', b'a\nb', b'a\x00b'):
        raises(sasl.decode_external, b64(bad), 'client sent invalid login in AUTH EXTERNAL command')


def test_sasl_error_is_exception():
    assert issubclass(SaslError, Exception)


# --- helpers -----------------------------------------------------------------

def test_check_credential():
    assert sasl.check_credential(b'alice smith \xff%')
    assert sasl.check_credential(b'')
    for bad in (b'a\r', b'\nb', b'a\x00b'):
        assert not sasl.check_credential(bad)


def test_make_salt():
    before = int(time.time())
    salt = sasl.make_salt('mail.example.com')
    after = int(time.time())
    m = re.fullmatch(rb'<(\d+)\.(\d+)@mail\.example\.com>', salt)
    assert m, salt
    assert 0 <= int(m.group(1)) < 2 ** 31
    assert before <= int(m.group(2)) <= after


def test_cram_md5_challenge():
    salt = b'<238188073.1163692009@mail.example.com>'
    ch = sasl.cram_md5_challenge(salt)
    assert base64.b64decode(ch) == salt
    assert sasl.cram_md5_challenge(salt + b'\r\n') == ch


def test_encode_plain():
    assert sasl.encode_plain(b'alice', b'secret') == b'AGFsaWNlAHNlY3JldA=='
    assert sasl.decode_plain(sasl.encode_plain(b'a b', b'p w')) == (b'a b', b'p w')


def test_constants():
    assert base64.b64decode(sasl.USERNAME_PROMPT) == b'Username:'
    assert base64.b64decode(sasl.PASSWORD_PROMPT) == b'Password:'
