//! The `tokentap` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tokentap",
    version,
    about = "Observability and cost-tracking proxy for OpenAI-compatible Chat Completions APIs",
    long_about = "tokentap sits in front of an OpenAI-compatible Chat Completions API, forwards \
                  every request and response unchanged, and records who called which model and \
                  what it cost."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// The TOML config file (see config/tokentap.toml).
        #[arg(short, long, default_value = "config/tokentap.toml")]
        config: PathBuf,
    },
    /// Validate a config file exactly as `serve` would, then exit (non-zero when invalid).
    CheckConfig {
        /// The TOML config file.
        config: PathBuf,
    },
    /// Spend per user, team or model over a date range, from the embedded ledger.
    Spend {
        /// The TOML config file (its budgets.ledger.path is read).
        #[arg(short, long, default_value = "config/tokentap.toml")]
        config: PathBuf,
        /// First day, inclusive (YYYY-MM-DD, in budgets.time_zone or utc_offset, like daily
        /// caps; UTC by default). Default: 30 days ago.
        #[arg(long)]
        from: Option<String>,
        /// Last day, inclusive (YYYY-MM-DD, same zone). Default: today.
        #[arg(long)]
        to: Option<String>,
        /// Group by user, team or model.
        #[arg(long, value_enum, default_value = "user")]
        by: ByArg,
        /// table, csv or json.
        #[arg(long, value_enum, default_value = "table")]
        format: FormatArg,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ByArg {
    User,
    Team,
    Model,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Table,
    Csv,
    Json,
}

fn spend(
    config: &std::path::Path,
    from: Option<String>,
    to: Option<String>,
    by: ByArg,
    format: FormatArg,
) -> Result<String, String> {
    use tokentap::budget::report;
    let cfg = tokentap::config::load(config).map_err(|e| e.to_string())?;
    // Days are the budgets' days: in budgets.time_zone (or utc_offset), like daily caps.
    let zone = cfg.budgets.offset();
    let today = report::date_of(tokentap::budget::now_unix(), zone);
    let from = match from {
        Some(d) => report::date(&d)?,
        None => today - chrono::Days::new(30),
    };
    let to = match to {
        Some(d) => report::date(&d)?,
        None => today,
    };
    if to < from {
        return Err(format!("--to {to} is before --from {from}"));
    }
    let after = to
        .checked_add_days(chrono::Days::new(1))
        .ok_or_else(|| format!("--to {to} is too far in the future"))?;
    let (from, to) = (report::midnight(from, zone), report::midnight(after, zone));
    let by = match by {
        ByArg::User => report::By::User,
        ByArg::Team => report::By::Team,
        ByArg::Model => report::By::Model,
    };
    let format = match format {
        FormatArg::Table => report::Format::Table,
        FormatArg::Csv => report::Format::Csv,
        FormatArg::Json => report::Format::Json,
    };
    report::report(&cfg.budgets.ledger.path, from, to, by, format)
}

fn main() -> ExitCode {
    // RUST_LOG, when set, governs logging; otherwise server.log_level does, and a reload can
    // change it (the logger lets everything through and log's max level filters).
    let log_from_env = std::env::var_os("RUST_LOG").is_some();
    let mut logger = env_logger::Builder::from_env(env_logger::Env::default());
    if !log_from_env {
        logger.filter_level(log::LevelFilter::Trace);
        // notify warns about its own bookkeeping when a watched directory's subdirectory
        // goes away (Kubernetes' old ..data targets): not the operator's concern.
        logger.filter_module("notify", log::LevelFilter::Error);
    }
    logger.target(env_logger::Target::Stderr).init();
    if !log_from_env {
        log::set_max_level(log::LevelFilter::Info);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match tokentap::config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok (upstream {}, {} priced models)",
                    config.display(),
                    c.upstream.url.host_header,
                    c.pricing.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Spend {
            config,
            from,
            to,
            by,
            format,
        } => match spend(&config, from, to, by, format) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tokentap spend: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => {
            let c = match tokentap::config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            if !log_from_env {
                log::set_max_level(c.server.log_level);
            }
            match tokentap::server::run(c, config, log_from_env) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tokentap: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
