"""The ``fedrwe`` command line.

    fedrwe simulate --sites 3 --patients 30000 --seed 7 --out out/demo
    fedrwe site serve --config site.toml
    fedrwe site ingest --omop export/ --config site.toml [--care-site ID] [--strict]
    fedrwe study run studies/ketamine_cud.yaml --superlink 127.0.0.1:9093 --root-certificates pki/ca.pem --out out/study
    fedrwe pki init --out pki --host superlink.example.org [--sites site_01,site_02]
    fedrwe pki site-key --out keys --site site_01
    fedrwe site pending --config site.toml          (studies waiting for the steward)
    fedrwe site approve STUDY_ID --config site.toml [--sha256 HASH] [--by NAME]
    fedrwe site approvals --config site.toml
    fedrwe keys new --owner site_01 --out keys/     (a private key and its public keyring)
    fedrwe keys trust keyring.json --add site_01.keyring.json [--retire-others-at ISO]
    fedrwe site audit verify --config site.toml     (and: fedrwe site audit show)
    fedrwe study status --out out/study [--json] [--prefect-api-url URL]
    fedrwe study report STUDY_ID --out out/study   (re-render report.html from results.json)
    fedrwe site status --config site.toml [--json] (what ran, pending approval, released)
    fedrwe protocol check studies/ketamine_cud.yaml

Site commands import only the site agent (no Prefect); study commands only the
coordinator side (no Spark). Errors print one clear line and the fix; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.audit_cli import audit_app
from shared.errors import FedRWEError, SettingsError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Federated real-world evidence.")
site_app = typer.Typer(no_args_is_help=True, help="Commands a hospital runs.")
study_app = typer.Typer(no_args_is_help=True, help="Commands a study lead runs.")
protocol_app = typer.Typer(no_args_is_help=True, help="Study protocols.")
pki_app = typer.Typer(no_args_is_help=True, help="Transport keys: TLS for the SuperLink, SuperNode keys.")
keys_app = typer.Typer(no_args_is_help=True, help="Signing keys and keyrings.")
app.add_typer(site_app, name="site")
app.add_typer(study_app, name="study")
app.add_typer(protocol_app, name="protocol")
app.add_typer(pki_app, name="pki")
app.add_typer(keys_app, name="keys")
site_app.add_typer(audit_app, name="audit")

console = Console(stderr=True)
_state = {"debug": False, "json": False}


@app.callback()
def _options(debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False) -> None:
    _state["debug"] = debug


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Output folder (data, logs, results).")] = Path("out/demo"),
    sites: Annotated[int, typer.Option(min=1, max=50, help="Number of simulated sites.")] = 3,
    patients: Annotated[int, typer.Option(min=100, help="CUD patients over the whole network.")] = 30_000,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 7,
    protocol: Annotated[Path, typer.Option(help="Study protocol YAML.")] = Path("studies/ketamine_cud.yaml"),
    prefect_api_url: Annotated[
        str | None, typer.Option(envvar="PREFECT_API_URL", help="Use this Prefect server instead of starting one.")
    ] = None,
    insecure_transport: Annotated[
        bool, typer.Option(help="Plain HTTP and no SuperNode authentication (debugging only).")
    ] = False,
) -> None:
    """Generate a synthetic network, start every process on 127.0.0.1, run the study, stop all."""
    from flows.simulate import SimulationSettings, run_simulation

    settings = SimulationSettings(
        out=out, sites=sites, patients=patients, seed=seed, protocol=protocol,
        prefect_api_url=prefect_api_url, insecure_transport=insecure_transport,
    )
    run_simulation(settings, console=Console())


@site_app.command("serve")
def site_serve(config: Annotated[Path, typer.Option(help="The site's settings (TOML).")]) -> None:
    """Run the long-lived site service (owns Spark; answers on the configured host:port)."""
    from site_agent.service import serve
    from site_agent.settings import load_site_settings

    serve(load_site_settings(config))


@site_app.command("ingest")
def site_ingest(
    omop: Annotated[Path, typer.Option(help="Folder of the OMOP CDM 5.3/5.4 export, one file per table.")],
    source_format: Annotated[Literal["csv", "parquet"], typer.Option("--format", help="The files' format.")] = "csv",
    site_id: Annotated[str | None, typer.Option(help="The site's id (default: the config's).")] = None,
    lake: Annotated[Path | None, typer.Option(help="Folder of the site's Delta tables (default: the config's).")] = None,
    config: Annotated[Path | None, typer.Option(help="The site's settings (TOML): site_id, lake.")] = None,
    care_site: Annotated[int | None, typer.Option(help="Keep only the persons of this care_site_id.")] = None,
    strict: Annotated[bool, typer.Option(help="Exit with an error when the data-quality report has errors.")] = False,
) -> None:
    """Load an OMOP CDM export into the site's Delta tables and report its data quality."""
    from site_agent.ingest import ingest_omop
    from site_agent.ingest.display import findings_table, tables_table
    from site_agent.ingest.settings import ingest_settings

    result = ingest_omop(ingest_settings(omop, source_format, site_id, lake, config, care_site))
    out = Console()
    out.print(tables_table(result))
    out.print(findings_table(result.report))
    out.print(f"data-quality report: {result.report_path}")
    if strict:
        result.report.raise_for_errors()


@site_app.command("check")
def site_check(config: Annotated[Path, typer.Option(help="The site's settings (TOML).")]) -> None:
    """Run the data-quality checks on the site's tables (what every study runs first)."""
    from site_agent.ingest import check_lake
    from site_agent.ingest.display import findings_table
    from site_agent.settings import load_site_settings

    settings = load_site_settings(config)
    report = check_lake(settings.lake, site_id=settings.site_id)
    Console().print(findings_table(report))
    report.raise_for_errors()


@site_app.command("pending")
def site_pending(config: Annotated[Path, typer.Option(help="The site's settings (TOML).")]) -> None:
    """Studies that asked to run here and were refused for lack of the steward's approval."""
    from site_agent.approval import approval_store
    from site_agent.settings import load_site_settings

    waiting = approval_store(load_site_settings(config).workdir).pending()
    if not waiting:
        typer.echo("no study is waiting for approval")
    for p in waiting:  # plain lines: the hash must stay whole to be checked and copied
        typer.echo(
            f"{p.study_id}: {p.title}\n  protocol sha256: {p.sha256}\n  analyses: {', '.join(p.analyses)}"
            + (f"\n  comparisons: {', '.join(p.comparisons)}" if p.comparisons else "")
            + f"\n  asked at: {p.asked_at}\n  to approve: fedrwe site approve {p.study_id} "
            f"--sha256 {p.sha256} --config {config}"
        )


@site_app.command("approve")
def site_approve(
    study_id: Annotated[str, typer.Argument(help="The study to approve.")],
    config: Annotated[Path, typer.Option(help="The site's settings (TOML).")],
    sha256: Annotated[str | None, typer.Option(help="The protocol hash to approve (default: the pending one).")] = None,
    by: Annotated[str | None, typer.Option(help="Who approves (default: the OS user).")] = None,
) -> None:
    """Approve a study's protocol (its SHA-256) at this site; a changed protocol needs a new approval."""
    import getpass

    from site_agent.approval import approval_store
    from site_agent.settings import load_site_settings

    approval = approval_store(load_site_settings(config).workdir).approve(study_id, sha256, by or getpass.getuser())
    typer.echo(
        f"approved {approval.study_id} (protocol sha256 {approval.sha256}) by {approval.approved_by} "
        f"at {approval.approved_at}"
    )


@site_app.command("approvals")
def site_approvals(config: Annotated[Path, typer.Option(help="The site's settings (TOML).")]) -> None:
    """Every approval given at this site: study, protocol hash, who and when."""
    from site_agent.approval import approval_store
    from site_agent.settings import load_site_settings

    given = approval_store(load_site_settings(config).workdir).approvals()
    if not given:
        typer.echo("no study has been approved at this site")
    for a in given:
        typer.echo(f"{a.study_id}  sha256 {a.sha256}  approved by {a.approved_by} at {a.approved_at}")


@site_app.command("status")
def site_status_command(
    config: Annotated[Path, typer.Option(help="The site's settings (TOML).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """For the steward: what ran here, what waits for approval, what was released."""
    from site_agent.audit.status import site_status
    from site_agent.settings import load_site_settings

    _state["json"] = as_json
    status = site_status(load_site_settings(config).workdir)
    if as_json:
        typer.echo(json.dumps(status, indent=2, sort_keys=True))
        return
    stdout = Console()
    stdout.print(f"audit log {status['audit_log']}: {status['entries']} entries", soft_wrap=True)
    table = Table(title="studies that ran here (from the audit log)", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="withheld: released with parts withheld; last: UTC")
    for column in ("study", "rounds", "replies by decision", "last"):
        table.add_column(column, justify="right" if column == "rounds" else "left", no_wrap=column != "replies by decision")
    for study_id, s in status["studies"].items():
        decisions = ", ".join(f"{kind} {n}" for kind, n in s["decisions"].items())
        table.add_row(study_id, str(len(s["rounds"])), decisions, s["last"][:19].replace("T", " "))
    stdout.print(table)
    if not status["pending"]:
        stdout.print("pending approval: none")
    for p in status["pending"]:
        typer.echo(f"pending approval: {p['study_id']} (asked {p['asked_at']}); to approve: "
                   f"fedrwe site approve {p['study_id']} --sha256 {p['sha256']} --config {config}")
    for a in status["approvals"]:
        typer.echo(f"approved: {a['study_id']} sha256 {a['sha256'][:12]} by {a['approved_by']} at {a['approved_at']}")


@keys_app.command("new")
def keys_new(
    owner: Annotated[str, typer.Option(help="Whose key: 'coordinator' or the site id.")],
    out: Annotated[Path, typer.Option(help="Folder for OWNER.pem (private) and OWNER.keyring.json (public).")],
) -> None:
    """Make a signing key; share only OWNER.keyring.json with the other side."""
    from shared.crypto import Keyring, generate_key, save_private_key

    private, public = out / f"{owner}.pem", out / f"{owner}.keyring.json"
    if private.exists():
        raise typer.BadParameter(f"{private} exists; it is never overwritten. Choose another --out.")
    key = generate_key()
    save_private_key(key, private)
    keyring = Keyring()
    entry = keyring.add(owner, key.public_key())
    keyring.save(public)
    Console().print(f"key {entry.key_id} of {owner}: private {private} (keep it there), public {public}")


@keys_app.command("trust")
def keys_trust(
    keyring: Annotated[Path, typer.Argument(help="The keyring to extend (created if missing).")],
    add: Annotated[Path, typer.Option(help="A keyring whose keys to trust (e.g. from `keys new`).")],
    retire_others_at: Annotated[
        str | None, typer.Option(help="Rotation: the same owners' other keys stop being valid at this ISO time.")
    ] = None,
) -> None:
    """Trust the keys of another keyring; with --retire-others-at, rotate their owners' old keys out."""
    from datetime import datetime

    from shared.crypto import Keyring, load_keyring

    target = load_keyring(keyring) if keyring.exists() else Keyring()
    new = load_keyring(add).entries()
    if retire_others_at is not None:
        try:
            when = datetime.fromisoformat(retire_others_at)
        except ValueError:
            raise SettingsError(f"--retire-others-at {retire_others_at!r} is not ISO 8601, e.g. 2026-12-01T00:00+00:00") from None
        if when.tzinfo is None:
            raise SettingsError(f"--retire-others-at {retire_others_at!r} needs a zone, e.g. +00:00")
        new_ids = {e.key_id for e in new}
        for entry in target.entries():
            if entry.owner in {e.owner for e in new} and entry.key_id not in new_ids:
                target.retire(entry.key_id, when.timestamp())
    for entry in new:
        target.add(entry.owner, entry.public_key, entry.retires_at)
    target.save(keyring)
    Console().print(f"{keyring}: " + ", ".join(f"{e.owner} {e.key_id}" for e in target.entries()))


# the SuperLink connection options of `study run` and `study resume`
RootCertificates = Annotated[
    Path | None, typer.Option(help="The federation's CA certificate (ca.pem): the SuperLink's TLS is checked against it.")
]
Insecure = Annotated[bool, typer.Option(help="Plain HTTP, for a SuperLink started with --insecure (debugging only).")]


@study_app.command("run")
def study_run(
    protocol: Annotated[Path, typer.Argument(help="Study protocol YAML.")],
    superlink: Annotated[str, typer.Option(help="Control API address of the SuperLink, host:port.")],
    out: Annotated[Path, typer.Option(help="Where results.json and report.html go.")] = Path("out/study"),
    min_sites: Annotated[int, typer.Option(min=1, help="Wait until this many sites are connected.")] = 1,
    prefect_api_url: Annotated[
        str | None, typer.Option(envvar="PREFECT_API_URL", help="Prefect server the study reports to.")
    ] = None,
    root_certificates: RootCertificates = None,
    insecure: Insecure = False,
    signing_key: Annotated[
        Path | None, typer.Option(help="The coordinator's private key (PEM); requests are signed with it.")
    ] = None,
    site_keyring: Annotated[
        Path | None, typer.Option(help="Keyring of the sites' public keys; replies are verified with it.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print results.json (or a JSON error object) to stdout and nothing else.")
    ] = False,
) -> None:
    """Submit a study to a running SuperLink and follow it to the end, round by round."""
    from flows.progress import JournalProgress
    from flows.submit import run_study_on_superlink

    _state["json"] = as_json
    keys = {"signing-key": str(signing_key.resolve()) if signing_key else "",
            "site-keyring": str(site_keyring.resolve()) if site_keyring else ""}

    def run() -> dict[str, Any]:
        return run_study_on_superlink(
            protocol, superlink, out, min_sites, prefect_api_url, keys,
            root_certificates=root_certificates, insecure=insecure,
        )

    if as_json:
        typer.echo(json.dumps(run(), indent=2, sort_keys=True))
        return
    with JournalProgress(out.resolve(), Console(), since=time.time()):
        results = run()
    _print_results(results, out, prefect_api_url)


def _print_results(results: dict[str, Any], out: Path, prefect_api_url: str | None) -> None:
    """The estimates, each comparison's sites, where the files are and the Prefect flow run's page."""
    from flows.progress import flow_run_url, participation_table
    from flows.summary import print_estimates

    stdout = Console()
    print_estimates(stdout, results)
    stdout.print(participation_table(results))
    stdout.print(f"results in {out / 'results.json'}, report in {out / 'report.html'}")
    url = flow_run_url(prefect_api_url, results)
    if url:
        stdout.print(f"Prefect flow run: {url}")


@study_app.command("resume")
def study_resume(
    study_id: Annotated[str, typer.Argument(help="The interrupted study's id.")],
    superlink: Annotated[str, typer.Option(help="Control API address of the SuperLink, host:port.")],
    out: Annotated[Path, typer.Option(help="The interrupted run's folder (its --out).")] = Path("out/study"),
    prefect_api_url: Annotated[
        str | None, typer.Option(envvar="PREFECT_API_URL", help="Prefect server (default: the one the run used).")
    ] = None,
    root_certificates: RootCertificates = None,
    insecure: Insecure = False,
) -> None:
    """Continue an interrupted study run from its last completed round (its journal in --out)."""
    from flows.progress import JournalProgress
    from flows.submit import resume_study_on_superlink

    with JournalProgress(out.resolve(), Console()):
        results = resume_study_on_superlink(
            study_id, superlink, out, prefect_api_url, root_certificates=root_certificates, insecure=insecure,
        )
    _print_results(results, out, prefect_api_url)
    replayed = results.get("orchestration", {}).get("rounds_replayed", 0)
    Console().print(f"resumed run {results['run_id']} ({replayed} rounds from the journal); results in {out / 'results.json'}")


@study_app.command("status")
def study_status_command(
    out: Annotated[Path, typer.Option(help="The study run's folder (its --out).")] = Path("out/study"),
    prefect_api_url: Annotated[
        str | None, typer.Option(help="Also ask this Prefect server for the flow run's state.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Where a study run is: running / complete / failed, rounds done, each site's last status."""
    from flows.progress import flow_run_state, rounds_table, study_status

    _state["json"] = as_json
    status = study_status(out)
    if status["state"] == "none" and "results" not in status:
        raise SettingsError(
            f"no study run in {out} (no journal/run.json, no results.json). Fix: pass the --out folder "
            f"the study was started with (`fedrwe study run ... --out DIR`)."
        )
    if prefect_api_url and status.get("prefect_flow_run_id"):
        status["prefect_state"] = flow_run_state(prefect_api_url, status["prefect_flow_run_id"])
    if as_json:
        typer.echo(json.dumps(status, indent=2, sort_keys=True))
        return
    stdout = Console()
    stdout.print(
        f"[bold]{status['study_id']}[/] run {status['run_id']}: [bold]{status['state']}[/], "
        f"{status['rounds_done']} round(s) done" + (f", started {status['started_at']}" if status["started_at"] else "")
    )
    stdout.print(rounds_table(status["rounds"]))
    if status["dropped"]:
        stdout.print(f"dropped (last status not ok): {', '.join(status['dropped'])}")
    if "error" in status:
        stdout.print(f"error: {escape(status['error'])}")
    if "prefect_state" in status:
        stdout.print(f"Prefect flow run {status['prefect_flow_run_id']}: {status['prefect_state']}")
    if "results" in status:
        stdout.print(f"results: {status['results']}")
    elif status["state"] == "running":
        stdout.print(f"if its coordinator stopped: fedrwe study resume {status['study_id']} --out {out} ...")


@study_app.command("report")
def study_report(
    study_id: Annotated[str, typer.Argument(help="The study whose report to re-render.")],
    out: Annotated[Path, typer.Option(help="The study run's folder (its --out), holding results.json.")] = Path("out/study"),
) -> None:
    """Re-render report.html from the stored results.json (no site is asked anything)."""
    from coordinator.report import write_report

    path = out / "results.json"
    if not path.is_file():
        raise SettingsError(
            f"no results.json in {out}. Fix: pass the --out folder of a completed run "
            f"(`fedrwe study status --out DIR` tells whether it completed)."
        )
    results = json.loads(path.read_text(encoding="utf-8"))
    if results.get("study_id") != study_id:
        raise SettingsError(
            f"{path} holds the results of study {results.get('study_id')!r}, not {study_id!r}. Fix: pass "
            f"{results.get('study_id')!r}, or the --out folder of study {study_id!r}."
        )
    truth = None
    truth_path = results.get("simulation", {}).get("truth_path")
    if truth_path and Path(truth_path).is_file():
        truth = json.loads(Path(truth_path).read_text(encoding="utf-8"))
    write_report(out / "report.html", results, truth)
    Console().print(f"wrote {out / 'report.html'} from {path}")


@protocol_app.command("check")
def protocol_check(protocol: Annotated[Path, typer.Argument(help="Study protocol YAML.")]) -> None:
    """Validate a protocol and print its hash."""
    from shared.protocol.model import load_protocol

    loaded = load_protocol(protocol)
    Console().print(f"{loaded.study_id}: valid, sha256 {loaded.sha256()}")


@protocol_app.command("schema")
def protocol_schema(
    out: Annotated[Path | None, typer.Option(help="Write the JSON Schema here instead of printing it.")] = None,
) -> None:
    """The protocol's JSON Schema (for editors and validators; docs/protocol.schema.json)."""
    from shared.protocol.model import protocol_json_schema

    text = protocol_json_schema()
    if out is None:
        print(text, end="")
    else:
        out.write_text(text, encoding="utf-8")


@pki_app.command("init")
def pki_init(
    out: Annotated[Path, typer.Option(help="Folder for ca.pem/.key, superlink.pem/.key and manifest.json.")],
    host: Annotated[str, typer.Option(help="The SuperLink's address as sites dial it (IP or DNS name).")] = "127.0.0.1",
    extra_host: Annotated[
        list[str] | None, typer.Option(help="Another name or IP the certificate must cover (repeatable).")
    ] = None,
    sites: Annotated[
        str, typer.Option(help="Comma-separated site ids to make SuperNode keys for (test networks only).")
    ] = "",
    force: Annotated[bool, typer.Option(help="Replace existing key files.")] = False,
) -> None:
    """The network operator's keys: a CA and the SuperLink's TLS certificate for --host."""
    from shared.pki import init_network

    site_ids = [s.strip() for s in sites.split(",") if s.strip()]
    pki = init_network(out, host=host, extra_hosts=extra_host or [], sites=site_ids, force=force)
    console_out = Console()
    console_out.print(f"CA certificate (give to every site and study lead): {pki.ca_cert}")
    console_out.print(f"SuperLink certificate for {host}: {pki.server_cert} (key {pki.server_key}, 0600)")
    for site_id, files in pki.sites.items():
        console_out.print(f"SuperNode key of {site_id}: {files.private_key} (register {files.public_key})")
    console_out.print(f"manifest: {pki.manifest}; keep ca.key offline, it signs the SuperLink's certificates")


@pki_app.command("server-cert")
def pki_server_cert(
    pki: Annotated[Path, typer.Option(help="The folder of `fedrwe pki init` (ca.pem, ca.key).")],
    host: Annotated[list[str], typer.Option(help="Name or IP the new certificate covers (repeatable).")],
    force: Annotated[bool, typer.Option(help="Replace the existing superlink.pem/.key.")] = False,
) -> None:
    """Re-issue the SuperLink's certificate with the same CA (new host, or before it expires)."""
    from shared.pki import issue_server_cert

    cert = issue_server_cert(pki / "ca.pem", pki / "ca.key", host, pki / "superlink.pem",
                             pki / "superlink.key", force=force)
    Console().print(f"{pki / 'superlink.pem'} for {', '.join(host)}, valid until {cert.not_valid_after_utc:%Y-%m-%d}; "
                    "restart flower-superlink to use it (sites keep their ca.pem)")


@pki_app.command("site-key")
def pki_site_key(
    out: Annotated[Path, typer.Option(help="Folder for <site>.key (0600) and <site>.pub.")],
    site: Annotated[str, typer.Option(help="This site's id, e.g. site_01.")],
    force: Annotated[bool, typer.Option(help="Replace an existing key pair.")] = False,
) -> None:
    """A site's own SuperNode key pair; send only the .pub file to the network operator."""
    from shared.pki import init_site_key

    files = init_site_key(out, site, force=force)
    console_out = Console()
    console_out.print(f"private key (stays here; flower-supernode --auth-supernode-private-key): {files.private_key}")
    console_out.print(f"public key (send to the operator for `flwr supernode register`): {files.public_key}")


def main() -> None:
    """Entry point: run the app; a fedrwe error is one clear line, exit code 2."""
    try:
        app(standalone_mode=False)
    except FedRWEError as error:
        if _state["json"]:
            typer.echo(json.dumps({"error": type(error).__name__, "message": str(error)}))
            sys.exit(2)
        if _state["debug"]:
            console.print_exception()
        console.print(f"[bold red]fedrwe:[/] {escape(str(error))}", highlight=False)
        sys.exit(2)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        console.print("interrupted; every process fedrwe started has been stopped")
        sys.exit(130)
    except Exception as error:  # click usage errors come here in non-standalone mode
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
