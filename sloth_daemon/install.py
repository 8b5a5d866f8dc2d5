"""`sloth-daemon install-service`: install this installation of sloth-daemon as a systemd service.

Contract:
- `plan(user=, prefix=, start=)` returns the ordered `Action`s; `--dry-run` prints them and changes nothing,
  otherwise `carry_out` runs them in order and stops at the first failure.
- Files, from the package's `sloth_daemon/systemd/` folder (package data, so a built wheel has them too): the unit at `<prefix>/etc/systemd/system/sloth-daemon.service`
  (always rewritten, so an upgrade gets the new unit; ExecStart is this installation's `sloth-daemon`, User= and
  Group= the service user), `<prefix>/etc/sloth-daemon/config.toml` and `<prefix>/etc/sloth-daemon/sloth-daemon.env`
  from the examples, written only when absent (an upgrade keeps your settings). Both may hold the API key: mode
  0640, group of the service user.
- Commands, only with `prefix` `/` (they act on the running system, not a staging root): create the system user
  when missing (`useradd --system`), add it to the `video` and `render` groups where those exist (GPU device
  nodes on some distributions), `systemctl daemon-reload`, `systemctl enable --now` (or only `enable`).
  With another prefix the files are written there (a packaging root) and the commands are printed, not run.
- The state directory is not made here: systemd creates /var/lib/sloth-daemon (StateDirectory=) owned by the user.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT_NAME = "sloth-daemon.service"
TEMPLATES = Path(__file__).resolve().parent / "systemd"  # package data: in a checkout and in an installed wheel
_HIDDEN_BY_PROTECT_HOME = ("/home/", "/root/", "/run/user/")


class InstallError(RuntimeError):
    pass


@dataclass(frozen=True)
class WriteFile:
    path: Path
    content: str
    mode: int = 0o644
    group: str | None = None  # chgrp to this group (needs root)
    keep_existing: bool = False

    def describe(self) -> str:
        extra = ", kept if it exists" if self.keep_existing else ""
        owner = f", group {self.group}" if self.group else ""
        return f"write {self.path} (mode {self.mode:04o}{owner}{extra})"


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    why: str

    def describe(self) -> str:
        return f"run   {' '.join(self.argv)}    # {self.why}"


@dataclass(frozen=True)
class _Later:
    """A command that acts on the live system, printed (not run) when installing into a packaging root."""

    command: Run

    def describe(self) -> str:
        return "later " + self.command.describe()[6:]


Action = WriteFile | Run | _Later


def sloth_executable() -> Path:
    """This installation's `sloth-daemon` script (beside the running Python, as in a venv)."""
    beside = Path(sys.executable).parent / "sloth-daemon"
    if beside.exists():
        return beside
    found = shutil.which("sloth-daemon")
    if found:
        return Path(found)
    raise InstallError("cannot find the sloth-daemon executable; run install-service with the installation's own "
                       "sloth-daemon (e.g. /opt/sloth-daemon/.venv/bin/sloth-daemon install-service)")


def render_unit(template: str, *, executable: Path, user: str, readme: Path | None = None) -> str:
    """The unit with ExecStart pointing at `executable` and the service running as `user`."""
    text, n = re.subn(r"^ExecStart=\S+", f"ExecStart={executable}", template, count=1, flags=re.M)
    if n != 1:
        raise InstallError("the unit template has no ExecStart= line")
    text = re.sub(r"^User=.*$", f"User={user}", text, flags=re.M)
    text = re.sub(r"^Group=.*$", f"Group={user}", text, flags=re.M)
    # The README where there is one (a checkout); an installed wheel has none, so no dangling link.
    text = re.sub(r"^Documentation=.*\n", f"Documentation=file://{readme}\n" if readme is not None else "", text,
                  flags=re.M)
    return text


def _hidden_from_service(path: Path) -> bool:
    return any(str(path).startswith(p) for p in _HIDDEN_BY_PROTECT_HOME)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def plan(*, user: str = "sloth", prefix: Path = Path("/"), start: bool = True,
         executable: Path | None = None) -> list[Action]:
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user):
        raise InstallError(f"--user {user!r} is not a valid system user name")
    if not (TEMPLATES / UNIT_NAME).exists():
        raise InstallError(f"unit template not found at {TEMPLATES / UNIT_NAME}: this installation of sloth-daemon "
                           "is incomplete; reinstall it")
    executable = executable or sloth_executable()
    live = prefix.resolve() == Path("/")
    if live and _hidden_from_service(executable):
        # With `pip install -e` in a venv inside the checkout (the README's way) this covers the code too.
        raise InstallError(f"the sloth-daemon executable is at {executable}, which the unit's ProtectHome=yes hides "
                           "from the service (and the service user cannot read): install under /opt/sloth-daemon")
    etc = prefix / "etc"
    readme = TEMPLATES.parent.parent / "README.md"  # a checkout has one; an installed wheel does not
    unit = render_unit((TEMPLATES / UNIT_NAME).read_text(), executable=executable, user=user,
                       readme=readme if readme.exists() else None)
    actions: list[Action] = []
    commands: list[Run] = []
    if not _user_exists(user):
        commands.append(Run(("useradd", "--system", "--user-group", "--home-dir", "/var/lib/sloth-daemon",
                             "--no-create-home", "--shell", "/usr/sbin/nologin", "--comment", "sloth-daemon", user),
                            "the service user"))
    gpu_groups = [g for g in ("video", "render") if _group_exists(g)]
    if gpu_groups:
        commands.append(Run(("usermod", "--append", "--groups", ",".join(gpu_groups), user),
                            "GPU device nodes may belong to these groups"))
    if live:
        actions.extend(commands)
    actions.append(WriteFile(etc / "systemd" / "system" / UNIT_NAME, unit))
    actions.append(WriteFile(etc / "sloth-daemon" / "config.toml",
                             (TEMPLATES / "sloth-daemon.toml.example").read_text(), mode=0o640,
                             group=user if live else None, keep_existing=True))
    actions.append(WriteFile(etc / "sloth-daemon" / "sloth-daemon.env",
                             (TEMPLATES / "sloth-daemon.env.example").read_text(), mode=0o640,
                             group=user if live else None, keep_existing=True))
    systemctl = [Run(("systemctl", "daemon-reload"), "load the new unit")]
    if start:
        systemctl.append(Run(("systemctl", "enable", "--now", UNIT_NAME), "start now and at every boot"))
    else:
        systemctl.append(Run(("systemctl", "enable", UNIT_NAME), "start at every boot"))
    if live:
        actions.extend(systemctl)
    else:
        commands.extend(systemctl)
    return actions if live else actions + [_Later(c) for c in commands]


def carry_out(actions: list[Action], echo=print) -> None:
    for action in actions:
        echo(action.describe())
        if isinstance(action, _Later):
            continue
        if isinstance(action, Run):
            try:
                subprocess.run(action.argv, check=True)
            except (OSError, subprocess.CalledProcessError) as e:
                raise InstallError(f"{' '.join(action.argv)} failed: {e}") from None
            continue
        path = action.path
        if action.keep_existing and path.exists():
            echo(f"      {path} exists: kept")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(action.content)
        os.chmod(tmp, action.mode)
        if action.group:
            os.chown(tmp, 0, grp.getgrnam(action.group).gr_gid)
        os.replace(tmp, path)


def install_service(*, user: str, prefix: Path, start: bool, dry_run: bool, executable: Path | None = None,
                    echo=print) -> list[Action]:
    actions = plan(user=user, prefix=prefix, start=start, executable=executable)
    if dry_run:
        echo("dry run: nothing is changed; these are the steps")
        for action in actions:
            echo(action.describe())
        return actions
    if prefix.resolve() == Path("/") and os.geteuid() != 0:
        raise InstallError("installing a system service needs root: run it with sudo (or try --dry-run)")
    carry_out(actions, echo)
    if prefix.resolve() == Path("/") and start:
        echo("installed and started; follow it with: journalctl -u sloth-daemon -f")
    return actions
