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
