//! `healer remediation`, `healer pause`, `healer resume` and `healer approvals`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use healer_engine::remedy::config::RemediationConfig;
use healer_engine::remedy::{Remediator, Report, Request, now_ms};
use healer_engine::store::Location;

#[derive(Debug, Subcommand)]
pub enum RemediationCommand {
    /// Run one action on one target now, through every safety rule (dry run unless the
    /// config says `mode = "enforce"`).
    Run(RunArgs),
    /// Take over sagas a stopped healer left in flight, expire approval requests and run
    /// approved remediations.
    Recover(CommonArgs),
    /// List the journal's sagas.
    List(CommonArgs),
    /// Show one saga and its steps.
    Show(ShowArgs),
    /// List the built-in and declared actions.
    Actions(ConfigArg),
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The remediation config (remediation.toml).
    #[arg(long)]
    config: PathBuf,
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Incident log to write the steps to (`remediations/`).
    #[arg(long)]
    log: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Action id (see `healer remediation actions`).
    action: String,
    /// Target resource.
    target: String,
    /// Incident id (part of the idempotency key; default: `manual-<ms>`).
    #[arg(long)]
    incident: Option<String>,
    /// Metrics parquet (file or folder) for preconditions that must hold `for` a while.
    #[arg(long)]
    telemetry: Option<String>,
    /// Ask for approval, with this reason, instead of running (`healer approvals approve`
    /// runs it).
    #[arg(long)]
    request_approval: Option<String>,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Saga id (a unique prefix is enough).
    saga: String,
}

#[derive(Debug, Args)]
pub struct PauseArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Why (recorded and shown to every refused action).
    #[arg(long)]
    reason: String,
    /// How long (default: until `healer resume`).
    #[arg(long = "for")]
    duration: Option<String>,
    /// Who (default: $USER).
    #[arg(long)]
    by: Option<String>,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Who (default: $USER).
    #[arg(long)]
    by: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Pending requests (all with --all).
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Answered and expired ones too.
        #[arg(long)]
        all: bool,
    },
    /// Approve a request; the remediation (or manual rollback) runs at once.
    Approve(DecideArgs),
    /// Deny a request.
    Deny(DecideArgs),
}

#[derive(Debug, Args)]
pub struct DecideArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Request id.
    id: String,
    /// Who (default: $USER).
    #[arg(long)]
    by: Option<String>,
    /// Incident log to write the steps to.
    #[arg(long)]
    log: Option<String>,
}

fn who(by: &Option<String>) -> String {
    by.clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
}

pub fn load(path: &Path) -> Result<RemediationConfig> {
    RemediationConfig::load(path).map_err(crate::problems_error)
}

pub fn open(path: &Path) -> Result<Remediator> {
    let config = load(path)?;
    Remediator::open(config).context("cannot open the saga journal")
}

pub fn print_report(r: &Report) {
    println!(
        "{} {} on {}: {}{}",
        if r.saga.is_empty() {
            "-".to_string()
        } else {
            r.saga[..12.min(r.saga.len())].to_string()
        },
        if r.action.is_empty() { "-" } else { &r.action },
        if r.target.is_empty() { "-" } else { &r.target },
        r.state,
        if r.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reason)
        }
    );
    for s in &r.steps {
        println!("    {s}");
    }
}

/// Writes the journal's new steps to `log`, when one is given.
pub async fn export(remediator: &Remediator, log: Option<&str>) -> Result<()> {
    if let Some(log) = log {
        let location = Location::parse(log, &Default::default(), true)?;
        let n = remediator
            .export(&location)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        if n > 0 {
            println!("{n} step(s) written to {}/remediations", location.display());
        }
    }
    Ok(())
}

/// Exit status of reports: failure when any remediation did not succeed (an operator's
/// script must see it).
fn status(reports: &[Report]) -> ExitCode {
    let bad = reports.iter().any(|r| {
        !matches!(
            r.state.as_str(),
            "succeeded" | "dry_run" | "awaiting_approval" | "approved"
        )
    });
    if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

pub async fn remediation(cmd: RemediationCommand) -> Result<ExitCode> {
    match cmd {
        RemediationCommand::Run(args) => {
            let mut r = open(&args.common.config.config)?;
            if let Some(path) = &args.telemetry {
                let samples =
                    healer_engine::remedy::read_telemetry(path, std::slice::from_ref(&args.target))
                        .await
                        .map_err(|e| anyhow::anyhow!(e))?;
                r.set_telemetry(samples);
            }
            let mut reports = r.recover().await?;
            for rep in &reports {
                print_report(rep);
            }
            let incident = args
                .incident
                .clone()
                .unwrap_or_else(|| format!("manual-{}", now_ms()));
            let escalation = healer_engine::notify::Escalation {
                id: incident.clone(),
                summary: format!("{} on {} (run by hand)", args.action, args.target),
                resource: args.target.clone(),
                root_cause: None,
                evidence: Vec::new(),
                reasons: vec!["run by hand".into()],
                tried: Vec::new(),
                affected: vec![args.target.clone()],
                start_ms: now_ms(),
            };
            let request = Request {
                incident,
                action: args.action.clone(),
                alternatives: Vec::new(),
                target: args.target.clone(),
                escalation,
                as_of_ms: None,
            };
            let report = match &args.request_approval {
                Some(why) => r.ask_approval(request, why).await?,
                None => r.remediate(request).await?,
            };
            print_report(&report);
            export(&r, args.common.log.as_deref()).await?;
            reports.push(report);
            Ok(status(&reports))
        }
        RemediationCommand::Recover(args) => {
            let r = open(&args.config.config)?;
            let mut reports = r.recover().await?;
            reports.extend(r.run_approved_rollbacks().await?);
            for rep in &reports {
                print_report(rep);
            }
            if reports.is_empty() {
                println!("nothing to recover");
            }
            export(&r, args.log.as_deref()).await?;
            Ok(status(&reports))
        }
        RemediationCommand::List(args) => {
            let r = open(&args.config.config)?;
            println!(
                "{:<12} {:<19} {:<20} {:<24} {:<18} reason",
                "saga", "created", "action", "target", "state"
            );
            for s in r.journal().sagas()? {
                println!(
                    "{:<12} {:<19} {:<20} {:<24} {:<18} {}",
                    &s.id[..12.min(s.id.len())],
                    crate::fmt_ts(s.created_ms),
                    s.action,
                    s.target,
                    if s.dry_run {
                        format!("{} (dry)", s.state)
                    } else {
                        s.state.clone()
                    },
                    s.reason
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        RemediationCommand::Show(args) => {
            let r = open(&args.config.config)?;
            let matches: Vec<_> = r
                .journal()
                .sagas()?
                .into_iter()
                .filter(|s| s.id.starts_with(&args.saga))
                .collect();
            match matches.as_slice() {
                [one] => {
                    print_report(&r.report(&one.id)?);
                    Ok(ExitCode::SUCCESS)
                }
                [] => anyhow::bail!("no saga `{}`", args.saga),
                _ => anyhow::bail!(
                    "`{}` names {} sagas: give more of the id",
                    args.saga,
                    matches.len()
                ),
            }
        }
        RemediationCommand::Actions(args) => {
            let config = load(&args.config)?;
            for a in config.library().all() {
                println!(
                    "{:<20} {:<17} {:<6} {:>6}  {}",
                    a.id,
                    a.operation.as_str(),
                    format!("{:?}", a.blast_radius).to_lowercase(),
                    a.estimated,
                    a.description
                );
                for p in &a.preconditions {
                    println!("{:<20} precondition: {}", "", p.describe());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn pause(args: PauseArgs) -> Result<ExitCode> {
    let r = open(&args.config.config)?;
    let until = match &args.duration {
        Some(d) => Some(
            now_ms()
                + humantime::parse_duration(d)
                    .with_context(|| format!("--for `{d}`"))?
                    .as_millis() as i64,
        ),
        None => None,
    };
    r.journal()
        .pause(&args.reason, &who(&args.by), now_ms(), until)?;
    println!(
        "paused{}: new remediations are refused; those in flight finish",
        until.map_or(String::new(), |u| format!(" until {}", crate::fmt_ts(u)))
    );
    Ok(ExitCode::SUCCESS)
}

pub fn resume(args: ResumeArgs) -> Result<ExitCode> {
    let r = open(&args.config.config)?;
    if r.journal().resume(&who(&args.by), now_ms())? {
        println!("resumed");
    } else {
        println!("was not paused");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn approvals(cmd: ApprovalsCommand) -> Result<ExitCode> {
    match cmd {
        ApprovalsCommand::List { config, all } => {
            let r = open(&config.config)?;
            let list = r.journal().approvals(all)?;
            if list.is_empty() {
                println!("no {}approval requests", if all { "" } else { "pending " });
            }
            for a in list {
                println!(
                    "{}  {:<8} {:<18} {:<24} {:<8} expires {}{}  {}",
                    a.id,
                    a.kind,
                    a.action,
                    a.target,
                    a.status,
                    crate::fmt_ts(a.expires_ms),
                    a.by.map_or(String::new(), |b| format!(" (by {b})")),
                    a.reason
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ApprovalsCommand::Approve(args) => decide(args, true).await,
        ApprovalsCommand::Deny(args) => decide(args, false).await,
    }
}

async fn decide(args: DecideArgs, approve: bool) -> Result<ExitCode> {
    let r = open(&args.config.config)?;
    let by = who(&args.by);
    match r
        .journal()
        .decide_approval(&args.id, approve, &by, now_ms())?
    {
        Ok(a) => println!("{} {} by {by}", a.id, a.status),
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
    }
    let mut reports = Vec::new();
    if approve {
        reports = r.recover().await?;
        reports.extend(r.run_approved_rollbacks().await?);
        for rep in &reports {
            print_report(rep);
        }
    }
    export(&r, args.log.as_deref()).await?;
    Ok(status(&reports))
}
