//! The `iamlet` binary: parse the command line, start logging, run the agent.

use std::process::ExitCode;

use iamlet::cli::{Cli, Command, LogFormat, Logging};
use iamlet::shutdown::Stopped;

/// jemalloc, with its background threads returning freed pages to the kernel after a few
/// seconds: pod churn (a node's pods replaced in bulk, thousands of watch events and STS
/// answers parsed) leaves RSS back at its baseline. glibc's malloc kept ~14 MiB of such
/// bursts resident for good, spread over its per-thread arenas (see the benchmark's churn
/// phase, and the README's "Memory").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    match cli.command {
        Some(Command::Cleanup) => return cleanup(),
        Some(Command::Explain(args)) => return explain(args),
        None => {}
    }
    let config = match cli.agent.validate() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("iamlet: {error}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.settings.logging);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("starting the tokio runtime");
    let outcome = runtime.block_on(iamlet::app::run(config));
    // Aborted, nothing is waited for: not the tasks the drain left, not a blocking call.
    runtime.shutdown_background();
    match outcome {
        Ok(Stopped::Drained) => ExitCode::SUCCESS,
        Ok(Stopped::Aborted) => ExitCode::from(130),
        Err(error) => {
            let error = iamlet::describe(error.as_ref());
            tracing::error!("{error}");
            eprintln!("iamlet: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `iamlet explain`: exit 0 when the pod gets a role, 1 when not, 2 for bad flags.
fn explain(args: Box<iamlet::cli::ExplainArgs>) -> ExitCode {
    let settings = match iamlet::explain::parse_target(&args.target).and_then(|_| args.components.clone().validate()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("iamlet explain: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("starting the tokio runtime");
    let node = args.node.as_deref().map(str::trim).filter(|node| !node.is_empty());
    match runtime.block_on(iamlet::explain::run(&settings, node, &args.target, args.check_sts)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("iamlet explain: {}", iamlet::describe(error.as_ref()));
            ExitCode::from(1)
        }
    }
}

/// `iamlet cleanup`: one line per iptables program, exit 0 unless iptables could not run.
fn cleanup() -> ExitCode {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("starting the tokio runtime");
    match runtime.block_on(iamlet::netfilter::cleanup()) {
        Ok(report) => {
            report.iter().for_each(|line| println!("{line}"));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("iamlet cleanup: {error}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(Logging { log_format, log_level }: Logging) {
    // RUST_LOG, when set, refines the level (e.g. `iamlet=debug,kube=info`).
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing_subscriber::filter::LevelFilter::from_level(log_level).into())
        .from_env_lossy();
    // Colours only on a terminal: `kubectl logs` and log shippers get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
