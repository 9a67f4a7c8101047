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
    /// Spend per user, team, model or API over a date range: with the Redis ledger, of every
    /// replica (as shipped to Redis, within about a second of each call's end); with the
    /// embedded ledger, or with --local, of this process's ledger file.
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
        /// With the Redis ledger: only this replica's calls, from its ledger file (also when
        /// Redis cannot be reached).
        #[arg(long)]
        local: bool,
    },
    /// Copy the embedded ledger to FILE while tokentap runs (a consistent snapshot).
    Backup {
        #[arg(short, long, default_value = "config/tokentap.toml")]
        config: PathBuf,
        /// Where the copy goes (must not exist yet).
        #[arg(long)]
        to: PathBuf,
    },
    /// Exit 0 when tokentap's admin listener answers /healthz with 200 (container health
    /// checks: the runtime image has no curl).
    Health {
        /// The admin listener's address.
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin: std::net::SocketAddr,
    },
    /// Issue, list and revoke virtual keys (auth.mode = "virtual_keys").
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Issue a key for a user: printed once; only its hash is kept (in auth.keys_file).
    Create {
        #[arg(short, long, default_value = "config/tokentap.toml")]
        config: PathBuf,
        #[arg(long)]
        user: String,
        /// A team the key's user belongs to (for the team's budget caps).
        #[arg(long)]
        team: Option<String>,
    },
    /// The issued keys (ids, users, teams; never the keys).
    List {
        #[arg(short, long, default_value = "config/tokentap.toml")]
        config: PathBuf,
    },
    /// Revoke a key by id: refused from the next reload on.
    Revoke {
        #[arg(short, long, default_value = "config/tokentap.toml")]
        config: PathBuf,
        id: String,
    },
}

/// `VACUUM INTO`: SQLite writes a consistent copy of the ledger, readers and the running
/// tokentap undisturbed (WAL mode).
fn backup(config: &std::path::Path, to: &std::path::Path) -> Result<String, String> {
    let cfg = tokentap::config::load(config).map_err(|e| e.to_string())?;
    let from = &cfg.budgets.ledger.path;
    if !from.exists() {
        return Err(format!(
            "{}: no ledger here (budgets.ledger.path)",
            from.display()
        ));
    }
    if to.exists() {
        return Err(format!("{} exists: give a new file", to.display()));
    }
    let db =
        rusqlite::Connection::open_with_flags(from, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| format!("{}: {e}", from.display()))?;
    db.execute("VACUUM INTO ?1", [to.to_string_lossy()])
        .map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))?;
    Ok(format!("{} -> {}\n", from.display(), to.display()))
}

/// One `GET /healthz` on the admin listener, with short timeouts.
fn health(admin: std::net::SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let t = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&admin, t).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 16];
    let n = s.read(&mut head).map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&head[..n]);
    if line.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "{admin}/healthz answered {:?}",
            line.lines().next().unwrap_or("")
        ))
    }
}

/// `tokentap keys ...`: works on the keys file named by the config's [auth] table.
fn keys(action: KeysCommand) -> Result<String, String> {
    use tokentap::auth;
    let file_of = |config: &std::path::Path| -> Result<PathBuf, String> {
        #[derive(serde::Deserialize)]
        struct Only {
            auth: Option<toml::Table>,
        }
        let text =
            std::fs::read_to_string(config).map_err(|e| format!("{}: {e}", config.display()))?;
        let only: Only = toml::from_str(&text).map_err(|e| format!("{}: {e}", config.display()))?;
        let name = only
            .auth
            .and_then(|a| {
                a.get("keys_file")
                    .and_then(|v| v.as_str())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| auth::RawAuth::default().keys_file);
        Ok(config
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join(name))
    };
    match action {
        KeysCommand::Create { config, user, team } => {
            if user.is_empty() || user.chars().any(char::is_control) {
                return Err("--user: give a non-empty user id without control characters".into());
            }
            let path = file_of(&config)?;
            let mut file = auth::read_keys(&path)?;
            let (key, stored) = auth::issue(&user, team.as_deref())?;
            let id = stored.id.clone();
            file.keys.push(stored);
            auth::write_keys(&path, &file)?;
            Ok(format!(
                "{key}\n(key {id} for user {user:?}; shown once, keep it now; {} keeps only its hash)\n",
                path.display()
            ))
        }
        KeysCommand::List { config } => {
            let file = auth::read_keys(&file_of(&config)?)?;
            let mut out = String::from("id\tuser\tteam\tcreated\trevoked\n");
            for k in file.keys {
                out.push_str(&format!(
                    "{}\t{}\t{}\t{}\t{}\n",
                    k.id,
                    k.user,
                    k.team.unwrap_or_default(),
                    k.created,
                    k.revoked
                ));
            }
            Ok(out)
        }
        KeysCommand::Revoke { config, id } => {
            let path = file_of(&config)?;
            let mut file = auth::read_keys(&path)?;
            let Some(k) = file.keys.iter_mut().find(|k| k.id == id) else {
                return Err(format!("no key {id:?} in {}", path.display()));
            };
            k.revoked = true;
            auth::write_keys(&path, &file)?;
            Ok(format!(
                "revoked {id}: refused once tokentap reloads (on its own when it watches {})\n",
                path.display()
            ))
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ByArg {
    User,
    Team,
    Model,
    /// The API dialect: chat_completions, responses, messages, embeddings, completions.
    Api,
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
    local: bool,
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
    let by = match by {
        ByArg::User => report::By::User,
        ByArg::Team => report::By::Team,
        ByArg::Model => report::By::Model,
        ByArg::Api => report::By::Api,
    };
    let format = match format {
        FormatArg::Table => report::Format::Table,
        FormatArg::Csv => report::Format::Csv,
        FormatArg::Json => report::Format::Json,
    };
    let calls = report::spend(&cfg.budgets.ledger, zone, from, to, by, local)?;
    Ok(report::render(calls, by, format))
}

/// mimalloc, not the system allocator (feature `mimalloc`, on by default). Why, and what was
/// measured: docs/benchmarks.md, "Tuning tried" (glibc's malloc and free took ~12 % of the proxy
/// thread's time per call).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// No transparent huge pages for this process. mimalloc is built not to ask for them (`no_thp`,
/// see Cargo.toml), which is enough where the host's THP mode is `madvise` (Debian's); where it
/// is `always`, the kernel would still back mimalloc's 2 MiB-aligned regions with huge pages and
/// RSS with many open streams would roughly double. Inherited by nothing that matters: tokentap
/// runs no child processes.
#[cfg(all(feature = "mimalloc", target_os = "linux"))]
fn no_huge_pages() -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    match unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn main() -> ExitCode {
    #[cfg(all(feature = "mimalloc", target_os = "linux"))]
    let thp = no_huge_pages();
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
    // Pingora's debug log prints whole request headers, API keys included: whatever the
    // level asked for, its modules log at info at most.
    for m in ["pingora_proxy", "pingora_core", "pingora"] {
        logger.filter_module(m, log::LevelFilter::Info);
    }
    logger.target(env_logger::Target::Stderr).init();
    if !log_from_env {
        log::set_max_level(log::LevelFilter::Info);
    }
    #[cfg(all(feature = "mimalloc", target_os = "linux"))]
    if let Err(e) = thp {
        log::warn!("could not turn transparent huge pages off (RSS may be higher): {e}");
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
            local,
        } => match spend(&config, from, to, by, format, local) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tokentap spend: {e}");
                ExitCode::from(2)
            }
        },
        Command::Backup { config, to } => match backup(&config, &to) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tokentap backup: {e}");
                ExitCode::from(2)
            }
        },
        Command::Health { admin } => match health(admin) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tokentap health: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Keys { action } => match keys(action) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tokentap keys: {e}");
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
