"""The protocol descriptors (protocols.py) agree with the modules they describe."""

from mailproxy import protocols


def test_each_descriptor_names_its_conversation():
    for name, proto in protocols.PROTOCOLS.items():
        # IANA's ALPN ids: ManageSieve's is "managesieve"
        alpn = b"managesieve" if name == "sieve" else name.encode()
        assert proto.conversation.protocol == name and proto.alpn == alpn
        # ManageSieve's texts are quoted strings
        assert proto.cert_error.replace(b'"', b"").endswith(b"SSL certificate error\r\n")
        assert proto.no_cert.replace(b'"', b"").endswith(b"No required SSL certificate\r\n")


def test_ports_imply_protocols_as_nginx():
    assert protocols.PORTS == {110: "pop3", 995: "pop3", 143: "imap", 993: "imap",
                               25: "smtp", 465: "smtp", 587: "smtp", 4190: "sieve"}
