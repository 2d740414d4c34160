"""The Debian package's generated parts, without building it (.ci/package-test builds, installs
and runs it): the man pages cover every directive, option and command; the packaged
configuration passes -t with the package's places; the changelog follows __version__."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mailproxy import __version__
from mailproxy.cli import USAGE
from mailproxy.config import DIRECTIVES

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("man")
    subprocess.run([sys.executable, str(PACKAGING / "man" / "gen.py"), "--output-dir", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return {name: (out / name).read_text(encoding="utf-8")
            for name in ("mailproxy.8", "mailproxy.ini.5")}


def _entries(page):
    """The directive names the page has an entry for (`.TP` then `.B name`)."""
    return set(name.replace("\\-", "-") for name in
               re.findall(r"^\.TP\n\.B (\S+)$", page, re.M))


def test_every_directive_has_an_entry_with_its_description(pages):
    page = pages["mailproxy.ini.5"]
    assert set(DIRECTIVES) <= _entries(page)
    # the description comes from the sample configuration's comment above the key
    assert "Number of worker processes" in page
    assert re.search(r"^\.B worker_processes\n.*Default: 1\.", page, re.M)


def test_a_directive_the_sample_does_not_describe_stops_the_generation(tmp_path):
    gen = _module(PACKAGING / "man" / "gen.py", "man_gen")
    sample = (REPO / "etc" / "mailproxy.ini").read_text(encoding="utf-8")
    bare = tmp_path / "mailproxy.ini"
    bare.write_text(sample.replace("# Number of worker processes, or \"auto\" for one per CPU.\n",
                                   ""), encoding="utf-8")
    with pytest.raises(SystemExit, match="worker_processes"):
        gen.man_ini("0", "2026-01-01", sample=str(bare))


def _usage_options_and_commands():
    options, commands, in_commands = set(), set(), False
    for line in USAGE.splitlines():
        if line.startswith("Commands"):
            in_commands = True
        elif in_commands and " : " in line:          # not a continuation line
            commands.add(line.split()[0])
        elif line.startswith("  -"):
            options.update(re.findall(r"-(\S)", line.split(":")[0]))
    return options, commands


def test_mailproxy_8_has_every_option_and_command(pages):
    page = pages["mailproxy.8"]
    options, commands = _usage_options_and_commands()
    assert {"h", "v", "V", "t", "T", "q", "s", "c", "?"} <= options
    assert {"sessions", "kick", "check", "convert"} <= commands
    tags = re.findall(r"^\.TP\n(.*)$", page, re.M)      # the first line of each entry
    for opt in options:
        assert any(re.search(r"\\-%s(\W|$)" % re.escape(opt), t) for t in tags), opt
    for cmd in commands:
        assert re.search(r"^(\\fB%s\\fR|\.B %s)" % (cmd, cmd), page, re.M), cmd
    for sig in ("stop", "quit", "reload", "reopen"):
        assert ".B %s\n" % sig in page
    assert "mailproxy %s" % __version__ in page and "@VERSION@" not in page


def test_packaged_configuration_passes_t_with_the_package_places(tmp_path):
    out = tmp_path / "mailproxy.ini"
    subprocess.run([sys.executable, str(PACKAGING / "deb" / "conffile.py"),
                    str(REPO / "etc" / "mailproxy.ini"), str(out)], check=True)
    text = out.read_text(encoding="utf-8")
    for line in ("pid = /run/mailproxy/mailproxy.pid",
                 "control_socket = /run/mailproxy/mailproxy.sock",
                 "error_log = /var/log/mailproxy/error.log info",
                 "access_log = /var/log/mailproxy/access.log", "user = mailproxy"):
        assert re.search("^%s$" % re.escape(line), text, re.M), line
    r = subprocess.run([sys.executable, str(REPO / "mailproxy.py"), "-t", "-c", str(out)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0, r.stdout


def test_conffile_refuses_a_sample_it_does_not_recognise():
    conffile = _module(PACKAGING / "deb" / "conffile.py", "deb_conffile")
    with pytest.raises(SystemExit, match="pid = mailproxy.pid"):
        conffile.packaged("[main]\npid = other.pid\n")


def test_changelog_names_the_code_version():
    # packaging/deb/build refuses to build otherwise; here it shows before CI's package test
    first = (PACKAGING / "deb" / "debian" / "changelog").read_text(encoding="utf-8").split("\n")[0]
    assert first.startswith("mailproxy (%s) " % __version__), first
