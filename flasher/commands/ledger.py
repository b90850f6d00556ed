"""``flasher ledger``: work on ledgers themselves; ``flasher ledger copy SRC DEST`` moves one (SQLite ⇄ PostgreSQL)."""

from __future__ import annotations

import click

from flasher.commands.options import config_option, err, secret_options


@click.group("ledger")
def ledger() -> None:
    """Work on ledgers themselves (copy one, SQLite or PostgreSQL).

    A ledger is a SQLite file or a postgresql://user@host/db that stations share.
    """


@ledger.command("copy")
@click.argument("src", metavar="SRC")
@click.argument("dest", metavar="DEST")
@click.option("--force", is_flag=True, help="Replace boards DEST has with other contents (never one a run is working on).")
@secret_options("ledger_password")
@config_option
def copy(src, dest, force, **_options):
    """Copy every board and step of ledger SRC into ledger DEST, in one transaction.

    Each of SRC and DEST is a SQLite file or postgresql://user@host/db. SRC is only
    read (an older SRC is read as it is, not migrated); DEST is created or migrated
    as provision would. A board DEST already has, identical, is left alone, so copying
    again is harmless; one it has with other contents stops the copy before anything
    is written, unless --force. A server's password comes from PGPASSWORD, ~/.pgpass or
    --ledger-password-file, never from the URL.

    \b
    Example:
      flasher ledger copy flasher-ledger.sqlite3 postgresql://flasher@db.lab/fleet
      flasher ledger copy postgresql://flasher@db.lab/fleet backup.sqlite3
    """
    from flasher.ledger import Ledger, copy_ledger, is_url
    from flasher.settings import SETTINGS, from_click

    s = from_click([])
    src, dest = SETTINGS["ledger"].parse(src, "SRC"), SETTINGS["ledger"].parse(dest, "DEST")
    password = s.secret("ledger_password", required=False) if is_url(src) or is_url(dest) else None
    with Ledger(src, create=False, readonly=True, password=password) as source, \
            Ledger(dest, password=password) as target:
        report = copy_ledger(source, target, force=force)
        err(f"copied {report.boards} board(s) from {source.path!s} to {target.path!s}: {report.copied} new, "
            f"{report.same} already there, {report.replaced} replaced ({report.steps} step rows written)"
            + (f"; {report.registrations} pre-registration(s): {report.registrations_copied} new, "
               f"{report.registrations_same} already there, {report.registrations_updated} updated"
               if report.registrations else ""))
    return 0
