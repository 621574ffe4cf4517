"""The ``fedrwe`` command line.

    fedrwe simulate --sites 3 --patients 30000 --seed 7 --out out/demo
    fedrwe site serve --config site.toml
    fedrwe site ingest --omop export/ --config site.toml [--care-site ID] [--strict]
    fedrwe site audit verify --config site.toml     (and: fedrwe site audit show)
    fedrwe study run studies/ketamine_cud.yaml --superlink 127.0.0.1:9093 --out out/study
    fedrwe protocol check studies/ketamine_cud.yaml

Site commands import only the site agent (no Prefect); study commands only the
coordinator side (no Spark). Errors print one clear line and the fix; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape

from flows.audit_cli import audit_app
from shared.errors import FedRWEError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Federated real-world evidence.")
site_app = typer.Typer(no_args_is_help=True, help="Commands a hospital runs.")
study_app = typer.Typer(no_args_is_help=True, help="Commands a study lead runs.")
protocol_app = typer.Typer(no_args_is_help=True, help="Study protocols.")
app.add_typer(site_app, name="site")
app.add_typer(study_app, name="study")
app.add_typer(protocol_app, name="protocol")
site_app.add_typer(audit_app, name="audit")

console = Console(stderr=True)
_state = {"debug": False}


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
) -> None:
    """Generate a synthetic network, start every process on 127.0.0.1, run the study, stop all."""
    from flows.simulate import SimulationSettings, run_simulation

    settings = SimulationSettings(
        out=out, sites=sites, patients=patients, seed=seed, protocol=protocol,
        prefect_api_url=prefect_api_url,
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


@study_app.command("run")
def study_run(
    protocol: Annotated[Path, typer.Argument(help="Study protocol YAML.")],
    superlink: Annotated[str, typer.Option(help="Control API address of the SuperLink, host:port.")],
    out: Annotated[Path, typer.Option(help="Where results.json and report.html go.")] = Path("out/study"),
    min_sites: Annotated[int, typer.Option(min=1, help="Wait until this many sites are connected.")] = 1,
    prefect_api_url: Annotated[
        str | None, typer.Option(envvar="PREFECT_API_URL", help="Prefect server the study reports to.")
    ] = None,
) -> None:
    """Submit a study to a running SuperLink and follow it to the end."""
    from flows.submit import run_study_on_superlink

    results = run_study_on_superlink(protocol, superlink, out, min_sites, prefect_api_url)
    from flows.summary import print_estimates

    print_estimates(Console(), results)
    Console().print(f"results in {out / 'results.json'}")


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


def main() -> None:
    """Entry point: run the app; a fedrwe error is one clear line, exit code 2."""
    try:
        app(standalone_mode=False)
    except FedRWEError as error:
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
