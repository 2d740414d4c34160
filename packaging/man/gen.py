#!/usr/bin/env python3
"""Write the man pages: `python3 packaging/man/gen.py --output-dir DIR` makes DIR/mailproxy.8
and DIR/mailproxy.ini.5.

mailproxy.ini(5) is generated, so it never drifts: one entry per directive of the directive
table (mailproxy/config/table.py: its sections, default, whether it repeats), described by the
comment above the directive in the sample configuration etc/mailproxy.ini, where the project
documents every key. A directive the sample does not describe stops the generation.
mailproxy(8) is packaging/man/mailproxy.8 with the version filled in.
"""

import argparse
import datetime
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(ROOT, "etc", "mailproxy.ini")

# a directive line of the sample, set or commented out: `key = value` / `#key = value`
_KEY = re.compile(r"^[#;]?([a-z0-9_]+)\s*=\s*(.*)$")
# a value's continuation line after a directive line (indented; commented: `#` then 2+ spaces)
_CONT = re.compile(r"^(\s+\S|[#;]\s\s+\S)")
_RULE = re.compile(r"^[#;]\s*---")


def _table():
    sys.path.insert(0, ROOT)
    from mailproxy.config.table import DIRECTIVES, REMOVED
    return DIRECTIVES, REMOVED


def sample_docs(path=SAMPLE, known=None):
    """{directive: (comment lines, first value lines)} from the sample configuration: the
    comment block right above a directive's first line; a directive right under another one
    (ssl_certificate_key under ssl_certificate) shares that one's comment."""
    docs = {}
    block = []          # the comment lines seen since the last blank or directive line
    last = None         # the directive whose lines (value and continuations) we are in
    record = None       # that directive, if this is its first line: its sample value lines
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for raw in lines:
        line = raw.rstrip()
        m = _KEY.match(line)
        if m and (known is None or m.group(1) in known):
            key, value = m.group(1), m.group(2).strip()
            record = None
            if key not in docs:
                comment = block if block else (docs[last][0] if last in docs else [])
                docs[key] = (list(comment), [value] if value else [])
                record = key
            last, block = key, []
            continue
        if last is not None and _CONT.match(line):
            if record and len(docs[record][1]) < 8:
                docs[record][1].append(line.lstrip("#; \t"))
            continue
        last = record = None
        if not line or line.startswith("["):
            block = []
        elif line[0] in "#;":
            if not _RULE.match(line):
                block.append(line[2:] if line[1:2] == " " else line[1:])
        else:
            block = []
    return docs


def roff_text(s):
    """Plain text made safe for roff: backslashes, leading dots and quotes, hyphens."""
    s = s.replace("\\", "\\e").replace("-", "\\-")
    if s[:1] in (".", "'"):
        s = "\\&" + s
    return s


def _default_text(d):
    if callable(d.default):
        return {"server_name": "this machine's host name"}.get(d.name, "one memory page")
    if d.default is None:
        return "unset"
    if d.default == "":
        return "none"
    return d.default


def _sections(d):
    names = [c for c in ("main", "mail", "server") if c in d.contexts]
    return ", ".join("[%s]" % n if n != "server" else "[server NAME]" for n in names)


def man_ini(version, date, sample=SAMPLE):
    directives, removed = _table()
    docs = sample_docs(sample, known=set(directives))
    missing = [name for name in directives if not docs.get(name, ([], []))[0]]
    if missing:
        raise SystemExit("gen.py: etc/mailproxy.ini describes no %s: add a comment above it"
                         % ", ".join(missing))
    out = [
        '.TH MAILPROXY.INI 5 "%s" "mailproxy %s" "File Formats"' % (date, version),
        ".ad l",
        ".SH NAME",
        "mailproxy.ini \\- configuration file of mailproxy, the IMAP, POP3 and SMTP proxy",
        ".SH SYNOPSIS",
        ".I /etc/mailproxy/mailproxy.ini",
        ".SH DESCRIPTION",
        "An INI file whose keys are nginx's mail directive names, written as in nginx without the",
        "trailing semicolon: flags on/off, sizes such as 8k or 1m, times such as 500ms, 60s, 5m, 1h30m",
        "or 24h. A value that holds spaces is quoted. A directive that nginx lets you repeat",
        "(listen, error_log, auth_http_header ...) is one key with one indented continuation",
        "line per occurrence:",
        ".PP",
        ".nf",
        ".RS",
        "listen =",
        "    *:143",
        "    *:993 ssl",
        ".RE",
        ".fi",
        ".PP",
        "Comments take whole lines only (starting with # or ;). Relative paths are taken relative",
        "to the folder of the file.",
        ".PP",
        "Sections: \\fB[main]\\fR (the process), \\fB[mail]\\fR (defaults for every server, as",
        "nginx's mail {} block) and one \\fB[server NAME]\\fR per nginx server {} block. A server that",
        "sets a key replaces the [mail] value entirely, lists included.",
        ".PP",
        "Check a file with \\fBmailproxy \\-t\\fR and print the effective configuration (defaults and",
        "inheritance applied) with \\fBmailproxy \\-T\\fR; a wrong value stops the start with the file,",
        "line, key and what is wrong.",
        ".SH DIRECTIVES",
        "Each entry gives the sections the directive may appear in, its default, and the first",
        "value the sample configuration shows for it.",
    ]
    groups = [("Process: [main]", lambda d: d.contexts == frozenset({"main"})),
              ("Sessions: [mail] and [server NAME]", lambda d: "mail" in d.contexts),
              ("Server only: [server NAME]", lambda d: d.contexts == frozenset({"server"}))]
    seen = set()
    for title, test in groups:
        out.append(".SS %s" % title)
        for name, d in directives.items():
            if name in seen or not test(d):
                continue
            seen.add(name)
            comment, values = docs[name]
            out.append(".TP")
            out.append(".B %s" % roff_text(name))
            facts = ["Sections: %s." % _sections(d)]
            if name in removed:
                facts.append("Refused (nginx removed it).")
            else:
                facts.append("Default: %s." % _default_text(d))
            if d.multi:
                facts.append("Repeatable: one continuation line per occurrence.")
            out.append(roff_text(" ".join(facts)))
            out.append(".br")
            out.extend(roff_text(c) if c.strip() else ".br" for c in comment)
            if values:
                out.append(".br")
                out.append("Sample: \\fB%s = %s\\fR" % (roff_text(name), roff_text(values[0])))
                for v in values[1:]:
                    out.append(".br")
                    out.append("\\fB\\ \\ \\ \\ %s\\fR" % roff_text(v))
    left = [n for n in directives if n not in seen]
    assert not left, left
    out += [
        ".SH FILES",
        ".TP",
        ".I /etc/mailproxy/mailproxy.ini",
        "the configuration the package installs and \\fBmailproxy\\fR(8) reads by default.",
        ".TP",
        ".I /usr/share/doc/mailproxy/README.md.gz",
        "the full documentation: every directive's behaviour and the differences from nginx.",
        ".SH SEE ALSO",
        ".BR mailproxy (8),",
        ".BR nginx (8)",
        "",
    ]
    return "\n".join(out)


def man_cli(version, date):
    with open(os.path.join(HERE, "mailproxy.8"), encoding="utf-8") as f:
        text = f.read()
    return text.replace("@VERSION@", version).replace("@DATE@", date)


def version():
    sys.path.insert(0, ROOT)
    from mailproxy import __version__
    return __version__


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", required=True)
    args = ap.parse_args(argv)
    # the date of the sample's last change would need git; SOURCE_DATE_EPOCH (set by
    # dpkg-buildpackage from debian/changelog) keeps the pages reproducible
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    date = (datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc) if epoch
            else datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%d")
    os.makedirs(args.output_dir, exist_ok=True)
    v = version()
    for name, text in (("mailproxy.8", man_cli(v, date)), ("mailproxy.ini.5", man_ini(v, date))):
        with open(os.path.join(args.output_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
        print(os.path.join(args.output_dir, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
