"""The trust commands: ``keel chain``, ``keel audit verify|show|export|keygen``, ``keel subjects erase|rotate-master``.

``register`` adds them to the main typer app; a ``KeelError`` becomes one ``[code] message``
line and exit 1 in ``keel.cli.main``, as does a file that cannot be read or written
(``file_not_found``, ``file_unreadable``, ``file_unwritable``) or an export line that is not
one (``audit_format``, naming ``file:line``).

``keel audit verify`` prints one line whose first word is the verdict, and exits with its code:

* exit 0, ``OK tenant=T records=N checkpoints=C anchored=N head=H``: intact, and a checkpoint
  from ``--from-checkpoint`` covers the head;
* exit 0, ``OK (unanchored) tenant=T ... anchored=A head=H: <why>``: intact, but no checkpoint
  kept outside covers the head. The checkpoints read from Kafka (or from the ``--records``
  export) can be truncated along with the records, so a truncated tail cannot be detected;
  with no checkpoint at all the line says so, as nothing then signs any head;
* exit 2, ``FAIL tenant=T seq=N kind=K: <detail>``: the first bad sequence number and why;
* exit 3, ``NOTHING tenant=T: ...``: no audit records (an unknown tenant, none chained yet,
  or an empty export), so nothing was verified.

``keel audit show`` prints personal values ``⟨sealed⟩`` or ``⟨erased⟩``; ``--reveal --as kind:id``
(also taken by ``keel state`` and ``keel replay``) prints them in plaintext once each tenant's
chain has the read as ``PersonalDataRead`` (``keel.trust.reveal``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError as ModelError
from rich.console import Console

from keel.bootstrap import trust_settings
from keel.cli.files import user_file
from keel.config import Settings
from keel.domain.envelope import Actor
from keel.errors import ValidationError
from keel.logs import configure_logging
from keel.observability import exporter as metrics
from keel.supervision import collector

if TYPE_CHECKING:
    from keel.supervision.progress import Progress
    from keel.trust.store import TenantAudit

_out = Console()

Reveal = Annotated[bool, typer.Option(
    "--reveal", help="Print personal fields in plaintext (needs --as); each tenant's audit chain records the "
                     "read as PersonalDataRead. Without it they read ⟨sealed⟩, or ⟨erased⟩ once erased.")]
RevealAs = Annotated[str | None, typer.Option("--as", help="Who reveals, as kind:id (e.g. human:dpo-alice).")]


def revealer(reveal: bool, acting: str | None) -> str | None:
    """``kind:id`` of who reveals personal data (``--reveal --as``), or ``None`` when nothing is revealed."""
    if not reveal:
        if acting is not None:
            raise typer.BadParameter("--as names who reveals personal data: give it with --reveal")
        return None
    if acting is None:
        raise typer.BadParameter("--reveal needs --as kind:id: the read is recorded in the audit chain under it")
    kind, _, actor_id = acting.partition(":")
    try:
        actor = Actor.model_validate({"kind": kind, "id": actor_id})
    except ModelError:
        raise ValidationError(f"--as must be kind:id with kind agent, human or service, not {acting!r}",
                              code="bad_actor", field="as") from None
    return f"{actor.kind.value}:{actor.id}"


def register(app: typer.Typer) -> None:
    """Add the trust commands to ``app``."""
    audit = typer.Typer(help="The tenant audit chain: verify, show, export, signing keys.", no_args_is_help=True)
    subjects = typer.Typer(help="Data subjects: crypto-shredding, master key rotation.", no_args_is_help=True)
    app.add_typer(audit, name="audit")
    app.add_typer(subjects, name="subjects")
    app.command("chain")(chain)
    audit.command("verify")(verify)
    audit.command("show")(show)
    audit.command("export")(export)
    audit.command("keygen")(keygen)
    subjects.command("erase")(erase)
    subjects.command("rotate-master")(rotate_master)


def chain(
    instance: str = typer.Option("0", help="Instance id (part of its transactional.id)."),
    caught_up: bool = typer.Option(False, "--until-caught-up", help="Exit once the intake backlog is chained."),
    supervised: bool = typer.Option(
        True, "--supervise/--no-supervise",
        help="Run the chainer in a child process that is restarted whenever it ends or stalls (default); "
             "--no-supervise runs it in this process (liveness: `keel health chainer --instance ID`)."),
) -> None:
    """Run the audit chainer: intake -> per-tenant hash chain + signed checkpoints (JSON logs)."""
    from keel.cli.workers import Role, child_argv
    from keel.supervision.supervisor import run_watched, supervise
    from keel.trust.chainer import Chainer
    from keel.trust.checkpoints import CheckpointSigner

    configure_logging(json_lines=True)
    settings = Settings()
    if supervised and not caught_up:
        supervise(child_argv("chain", instance), settings, Role.CHAINER, instance)
        return
    trust = trust_settings(settings)

    def build(progress: Progress | None = None) -> Chainer:
        chainer = Chainer(settings, CheckpointSigner.from_settings(trust), instance_id=instance,
                          checkpoint_every=trust.audit_checkpoint_every,
                          checkpoint_interval_s=trust.audit_checkpoint_interval_s,
                          linger_s=trust.audit_chain_linger_s, progress=progress)
        collector.settle()
        return chainer

    if not caught_up:
        metrics.start(settings, "chainer", instance)
        run_watched(settings, Role.CHAINER, instance, build)
        return
    chainer = build()
    try:
        stats = chainer.run_until_caught_up(timeout_s=300)
        _out.print(f"chained {stats.records} records, {stats.checkpoints} checkpoints")
    finally:
        chainer.close()


def verify(
    tenant: str = typer.Option(..., help="Tenant whose chain to verify."),
    from_checkpoint: list[Path] = typer.Option(  # noqa: B008
        [], "--from-checkpoint", help="Trusted checkpoints kept outside the system (export or checkpoint file); "
                                      "only one covering the head reveals a truncated tail."),
    records: Path | None = typer.Option(None, help="Verify an exported file instead of Kafka."),
) -> None:
    """Recompute the tenant's chain and check every checkpoint: OK, or the first bad seq and why.

    Exit 0: OK, intact. "OK (unanchored)": no --from-checkpoint covers the head, so a truncated tail is undetectable.
    Exit 2: FAIL, the first bad seq and its kind.
    Exit 3: NOTHING, no audit records (an unknown tenant, none chained yet, or an empty export).
    """
    from keel.trust.checkpoints import TrustedKeys
    from keel.trust.store import read_audit
    from keel.trust.verify import verify_chain

    anchors = [cp for path in from_checkpoint for cp in _read_export(path, tenant).checkpoints]
    audit = _read_export(records, tenant) if records else read_audit(Settings(), tenant)
    report = verify_chain(tenant, audit.records, audit.checkpoints,
                          TrustedKeys.from_settings(trust_settings(Settings())), anchors=anchors)
    _out.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if report.ok else 2 if report.failure else 3)


def _read_export(path: Path, tenant: str) -> TenantAudit:
    """An export file named on the command line; its I/O failures name it."""
    from keel.trust.store import read_export

    with user_file(path):
        return read_export(path, tenant)


def show(
    tenant: str = typer.Option(..., help="Tenant."),
    command: str | None = typer.Option(None, help="A command id: its whole story (decision, approvals, "
                                                     "execution, and the compensation that undid it)."),
    subject: str | None = typer.Option(None, help="A data subject (on-behalf-of): everything done for them, "
                                                     "with the approvals and compensations of those commands."),
    reveal: Reveal = False,
    acting: RevealAs = None,
) -> None:
    """Print a readable trail: when, what, who, under what authority, who approved it, and what undid it.

    The trail follows every record caused by or correlated with a command on it, or naming one in its
    payload (an approval's command id, a compensation's ``reverses``), so one trail tells the whole story.
    """
    from keel.trust.reveal import open_reader, record_reads
    from keel.trust.show import render_trail, select_trail
    from keel.trust.store import read_audit

    if (command is None) == (subject is None):
        raise typer.BadParameter("give exactly one of --command or --subject")
    who = revealer(reveal, acting)
    settings = Settings()
    audit = read_audit(settings, tenant)
    with open_reader(settings, reveal=who is not None) as reader:
        lines = render_trail(select_trail(audit.records, command=command, subject=subject), reader)
        if who is not None:  # recorded before anything revealed is printed
            record_reads(settings, reader.take(), actor=who, via="keel audit show")
    for line in lines:
        _out.print(line, markup=False, highlight=False, soft_wrap=True)


def export(
    tenant: str = typer.Option(..., help="Tenant."),
    out: Path = typer.Option(..., help="File to write (JSON lines of records and checkpoints)."),
) -> None:
    """Export the tenant's chain and checkpoints to a file that can live outside the system."""
    from keel.trust.store import export_audit, read_audit

    audit = read_audit(Settings(), tenant)
    with user_file(out, writing=True):
        lines = export_audit(audit, out)
    _out.print(f"wrote {lines} lines to {out}")


def keygen(
    key_id: str = typer.Option(..., help="Id of the new signing key, e.g. k2 (rotation: a new id each time)."),
    folder: Path = typer.Option(..., "--dir", help="Where to write <key-id>.pem and <key-id>.pub.pem."),
) -> None:
    """Create an Ed25519 checkpoint signing key pair."""
    from keel.trust.checkpoints import generate_signing_key

    with user_file(folder, writing=True):
        private, public = generate_signing_key(folder, key_id)
    _out.print(f"private key {private} (KEEL_AUDIT_SIGNING_KEY_FILE), public key {public} "
               "(copy into KEEL_AUDIT_TRUSTED_KEYS_DIR)")


def erase(
    tenant: str = typer.Option(..., help="Tenant."),
    subject: str = typer.Option(..., help="The data subject (on-behalf-of id) to erase."),
    actor: str = typer.Option(..., help="Who erases, as kind:id, e.g. human:dpo-alice."),
    reason: str = typer.Option("erasure request", help="Why (kept in the receipt)."),
    redact: bool = typer.Option(True, help="Also redact the subject's projected rows in ClickHouse "
                                "(embedded chDB: stop `keel project --follow` first)."),
) -> None:
    """Crypto-shred a subject: delete their data keys, audit a SubjectErased receipt, redact projections."""
    from keel.trust.erasure import erase_subject, redaction_sql
    from keel.trust.keystore import open_keystore

    settings = Settings()
    with open_keystore(settings, trust_settings(settings)) as keys:
        receipt = erase_subject(settings, keys, tenant=tenant, subject=subject, actor=actor, reason=reason)
    _out.print(f"erased subject {subject} of {tenant}: {len(receipt.key_ids)} key(s) deleted, "
               f"receipt {receipt.receipt_id}", soft_wrap=True)
    if redact:
        from keel.projector.clickhouse import connect
        from keel.projector.migrations import apply_migrations
        from keel.replay.rebuild import PREVIOUS, table_exists

        client = connect(settings)
        try:
            apply_migrations(client)
            # Both log tables hold personal fields, and a rollback would bring back what a rebuild kept aside.
            tables = [t for t in ("events", "commands", f"events{PREVIOUS}", f"commands{PREVIOUS}")
                      if table_exists(client, t)]
            for table in tables:
                client.command(redaction_sql(table), parameters={"tenant": tenant, "subject": subject})
        finally:
            client.close()
        _out.print(f"projected rows redacted in {', '.join(tables)}", soft_wrap=True)


def rotate_master() -> None:
    """Re-wrap every data key under KEEL_MASTER_KEY_FILE that KEEL_MASTER_KEY_PREVIOUS_FILE wrapped."""
    from keel.errors import ConfigError
    from keel.trust.errors import KeyUnwrapFailed
    from keel.trust.keystore import open_keystore

    settings = Settings()
    trust = trust_settings(settings)
    if trust.master_key_previous_file is None:
        raise ConfigError("set KEEL_MASTER_KEY_PREVIOUS_FILE to the root being rotated away from "
                          "(and KEEL_MASTER_KEY_FILE to the new one)", code="previous_master_key_missing")
    with open_keystore(settings, trust) as keys:
        report = keys.rotate()
    _out.print(f"re-wrapped {report.rewrapped} data key(s) under the current master key; "
               f"{report.current} already were")
    if report.unreadable:
        raise KeyUnwrapFailed(f"{len(report.unreadable)} data key(s) unwrap under neither master key, left as "
                              f"they are: {', '.join(report.unreadable[:5])}")
    _out.print("every data key is now under KEEL_MASTER_KEY_FILE: KEEL_MASTER_KEY_PREVIOUS_FILE can be retired")
