"""The command line: ``mailproxy [-c FILE] [-t|-T] [-q] [-v|-V] [-s stop|quit|reload|reopen] [-h]``
and the commands ``sessions [USER]`` / ``kick USER|--backend ADDR`` (control_cli.py),
``check`` (check.py) and ``convert NGINX.CONF`` (convert.py)

Parses the options, loads and tests the configuration, signals a running master (-s), or
starts one: the master and worker processes are supervisor.py's.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from . import __version__
from .control_cli import COMMANDS
from .supervisor import NAME, Master, err as _err, load_config

if TYPE_CHECKING:
    from .config import Config

DEFAULT_CONF = "/etc/mailproxy.ini"
TOOLS = ("check", "convert")

SIGNALS = {"stop": signal.SIGTERM, "quit": signal.SIGQUIT,
           "reload": signal.SIGHUP, "reopen": signal.SIGUSR1}

USAGE = """\
Usage: mailproxy [-?hvVtTq] [-s signal] [-c filename] [command]

Options:
  -?,-h         : this help
  -v            : show version and exit
  -V            : show version, Python version and supported features, and exit
  -t            : test configuration and exit
  -T            : test configuration, dump it and exit
  -q            : suppress non-error messages during configuration testing
  -s signal     : send signal to a master process: stop, quit, reopen, reload
  -c filename   : set configuration file (default: %s)

Commands (through the running instance's control_socket):
  sessions [USER] [--backend ADDR] [--json] : list live sessions
  kick USER | --backend ADDR                : end them, print how many

Commands without a running instance:
  check [--timeout seconds]                 : test the configuration, then probe what it
                                              points at (exit 0 ok, 1 warnings, 2 errors)
  convert [-p prefix] [-o file] nginx.conf  : write nginx's mail configuration as this INI
""" % DEFAULT_CONF


class _Usage(Exception):
    pass


def parse_args(argv: List[str]) -> Dict[str, Any]:
    """nginx-style option parsing: flags may be combined (-tq), -c/-s take the rest or the next."""
    opts = {"conf": None, "test": False, "dump": False, "quiet": False, "version": False,
            "features": False, "signal": None, "help": False, "command": None, "args": []}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in COMMANDS + TOOLS:     # the command's own words follow it
            opts["command"], opts["args"] = arg, argv[i:]
            break
        if not arg.startswith("-") or arg == "-":
            raise _Usage('invalid option: "%s"' % arg)
        p = arg[1:]
        while p:
            c, p = p[0], p[1:]
            if c in "?h":
                opts["help"] = True
            elif c == "v":
                opts["version"] = True
            elif c == "V":
                opts["version"] = opts["features"] = True
            elif c == "t":
                opts["test"] = True
            elif c == "T":
                opts["test"] = opts["dump"] = True
            elif c == "q":
                opts["quiet"] = True
            elif c in "cs":
                if p:
                    value, p = p, ""
                elif i < len(argv):
                    value = argv[i]
                    i += 1
                else:
                    raise _Usage('option "-%s" requires %s'
                                 % (c, "file name" if c == "c" else "parameter"))
                if c == "c":
                    opts["conf"] = value
                else:
                    if value not in SIGNALS:
                        raise _Usage('invalid option: "-s %s"' % value)
                    opts["signal"] = value
            else:
                raise _Usage('invalid option: "%s"' % c)
    return opts


def _features():
    lines = ["Python %s (%s)" % (sys.version.split()[0], sys.executable or "python3")]
    try:
        from .protocols import PROTOCOLS
    except Exception as e:      # a broken build still answers -V
        lines.append("protocol table unavailable: %s" % e)
    else:
        lines.append("protocols: " + ", ".join(PROTOCOLS))
    lines.append("listeners: IPv4, IPv6%s" % (
        ", multipath (MPTCP)" if sys.platform.startswith("linux") else ""))
    lines.append("logging: file, stderr, syslog (UDP); systemd notify (Type=notify)")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of every launcher; returns the exit code."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        opts = parse_args(list(argv))
    except _Usage as e:
        _err(str(e))
        return 1
    if opts["help"]:
        sys.stderr.write("%s version: %s/%s\n%s" % (NAME, NAME, __version__, USAGE))
        return 0
    if opts["version"]:
        sys.stderr.write("%s version: %s/%s\n" % (NAME, NAME, __version__))
        if opts["features"]:
            sys.stderr.write("".join(line + "\n" for line in _features()))
        sys.stderr.flush()
        if not opts["test"] and not opts["signal"]:
            return 0
    if opts["command"] == "convert":        # reads nginx.conf, not ours
        from . import convert
        return convert.main(opts["args"])
    path = os.path.abspath(opts["conf"] or DEFAULT_CONF)

    from .errors import ConfigError
    try:
        cfg = load_config(path)     # the configuration and every TLS context, as a reload
    except ConfigError as e:
        _err("[emerg] %s" % e)
        return _failed(opts, path)
    except OSError as e:
        _err('[emerg] open() "%s" failed (%d: %s)' % (path, e.errno or 0, e.strerror or e))
        return _failed(opts, path)

    checking = opts["command"] == "check"
    if opts["test"] or checking:
        # -t loads every module the start loads, so a Python that cannot run them fails here
        try:
            Master._preload()
        except Exception as e:
            _err("[emerg] cannot load the proxy's modules with this Python: %s" % e)
            _err("configuration file %s test failed" % path)
            return 2 if checking else 1
        if not opts["quiet"]:
            _err("the configuration file %s syntax is ok" % path)
            _err("configuration file %s test is successful" % path)
        if checking and not opts["test"]:
            from . import check
            return check.main(cfg, opts["args"])
        if opts["dump"]:
            text = cfg.dump()
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            sys.stdout.flush()
        return 0
    if opts["signal"]:
        return send_signal(cfg, path, opts["signal"])
    if opts["command"]:
        from . import control_cli
        return control_cli.run(cfg.main.control_socket, path, opts["command"], opts["args"])
    return Master(path, cfg).run()


def _failed(opts: Dict[str, Any], path: str) -> int:
    """-t and check say the test failed; check's exit status for errors is 2."""
    if opts["test"] or opts["command"] == "check":
        _err("configuration file %s test failed" % path)
    return 2 if opts["command"] == "check" else 1


def send_signal(cfg: Config, path: str, name: str) -> int:
    pidfile = cfg.main.pid
    if not pidfile:
        _err("[error] no pid file is configured in %s ([main] pid), cannot send \"%s\""
             % (path, name))
        return 1
    from . import pidfile as pidmod
    try:
        pid = pidmod.read(pidfile)
    except OSError as e:
        _err('[error] open() "%s" failed (%d: %s)' % (pidfile, e.errno or 0, e.strerror))
        return 1
    except ValueError as e:
        _err("[error] %s" % e)
        return 1
    # only a master holding this very pid file open is signalled (pidfile.holder): not a
    # process named by a planted or stale pid file
    try:
        ours = pidmod.holder(pid, pidfile)
    except OSError as e:
        _err('[error] cannot check process %d (%d: %s)' % (pid, e.errno or 0, e.strerror))
        return 1
    if not ours:
        _err('[error] process %d named in "%s" is not a running %s master, not signalled'
             % (pid, pidfile, NAME))
        return 1
    try:
        os.kill(pid, SIGNALS[name])
    except OSError as e:
        _err("[alert] kill(%d, %d) failed (%d: %s)" % (pid, SIGNALS[name], e.errno or 0,
                                                       e.strerror))
        return 1
    return 0

