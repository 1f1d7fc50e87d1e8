//! The `semoe` command line: one file per command (`train`, `chaos`, `generate`, `serve`, `eval`, `runs`, `bench`),
//! each with its arguments and what it does; this file holds the top-level parser and dispatch.

pub mod bench;
pub mod chaos;
pub mod eval;
pub mod generate;
pub mod runs;
pub mod serve;
pub mod train;
pub mod worker;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

use bench::BenchCommand;
use chaos::ChaosArgs;
use eval::EvalArgs;
use generate::GenerateArgs;
use runs::RunsArgs;
use serve::ServeArgs;
use train::TrainArgs;
use worker::{TicketArgs, WorkerArgs};

#[derive(Parser)]
#[command(
    name = "semoe",
    version,
    about = "Elastic Mixture-of-Experts training and inference runtime",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train a GPT-style MoE language model (by default on the bundled Shakespeare corpus), then
    /// write a report and print a sample.
    Train(Box<TrainArgs>),
    /// Generate text from a checkpoint, streaming it as it is sampled.
    Generate(GenerateArgs),
    /// Serve completions over HTTP (POST /v1/completions, streamed or whole; GET /health, GET
    /// /metrics) with continuous batching; SIGTERM or Ctrl-C shut it down gracefully.
    Serve(ServeArgs),
    /// The loss (nats/byte) of a checkpoint on a text: its run's validation text, or any file.
    Eval(EvalArgs),
    /// List the runs under a directory (default `runs/`): steps, validation loss, time, status.
    Runs(RunsArgs),
    /// Train a job under a fault scenario (`--scenario FILE`) and again undisturbed on the in-process
    /// actor runtime; report each fault, its detection and recovery, and whether the final state is
    /// bitwise equal (`chaos.md`, `chaos.json` in the run directory).
    Chaos(Box<ChaosArgs>),
    /// Join a training run as a worker process (`--ticket RUN_DIR/join.ticket`); SIGTERM leaves it
    /// in good order.
    Worker(WorkerArgs),
    /// Make a job identity and join ticket ahead of a run (for `semoe train --identity DIR`).
    Ticket(TicketArgs),
    /// Measure kernels and layers (tokens/s, GFLOP/s, fraction of the machine's peak).
    #[command(subcommand)]
    Bench(BenchCommand),
}

pub fn print_json(report: &impl serde::Serialize) -> semoe::Result<()> {
    let line = serde_json::to_string(report).map_err(|e| semoe::Error::parse("report", e.to_string()))?;
    semoe::console::write_stdout(&format!("{line}\n"), "the report")
}

/// Parse the command line (exiting with clap's message on a usage error).
pub fn parse() -> Cli {
    let matches = match train::with_config_defaults(Cli::command()).try_get_matches() {
        Ok(m) => m,
        Err(e) => refuse_usage(e),
    };
    match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => refuse_usage(e),
    }
}

/// Print a command-line error and exit: with clap's status (2), or for `semoe chaos`, whose 2 means
/// "the disturbed run stopped with an error", with [`chaos::COULD_NOT_RUN`].
fn refuse_usage(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    let shown = matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion);
    if !shown && std::env::args_os().nth(1).is_some_and(|c| c == "chaos") {
        let _ = e.print();
        std::process::exit(chaos::COULD_NOT_RUN.into());
    }
    e.exit()
}

/// Run the command the user gave.
pub fn run(cli: Cli) -> semoe::Result<ExitCode> {
    match cli.command {
        Command::Train(a) => return train::run(&a),
        Command::Generate(a) => generate::run(&a)?,
        Command::Serve(a) => serve::run(&a)?,
        Command::Eval(a) => eval::run(&a)?,
        Command::Runs(a) => runs::run(&a)?,
        Command::Bench(b) => bench::run(b)?,
        // Its exit statuses 1 to 3 are verdicts: an error that kept it from judging has its own.
        Command::Chaos(a) => {
            return Ok(chaos::run(&a).unwrap_or_else(|e| {
                semoe::say!("error: {e}");
                ExitCode::from(chaos::COULD_NOT_RUN)
            }))
        }
        Command::Worker(a) => return worker::run(&a),
        Command::Ticket(a) => worker::ticket(&a)?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        train::with_config_defaults(Cli::command()).debug_assert();
    }

    #[test]
    fn chaos_help_shows_only_the_options_a_chaos_run_accepts() {
        let mut cmd = train::with_config_defaults(Cli::command());
        let Some(chaos) = cmd.find_subcommand_mut("chaos") else {
            panic!("no chaos command")
        };
        let help = chaos.render_long_help().to_string();
        assert!(help.contains("--scenario") && help.contains("--processes"), "{help}");
        assert!(help.contains("runs/chaos-YYYYMMDD-HHMMSS"), "{help}");
        let shown: Vec<String> = chaos
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect();
        let refused = [
            "resume",
            "allow-data-change",
            "listen",
            "identity",
            "join-wait",
            "metrics-addr",
            "time-budget",
            "print-config",
            "device",
            "time-limit",
            "eval-every",
            "checkpoint-every",
            "sample-tokens",
            "sample-prompt",
            "quiet",
        ];
        for flag in refused {
            assert!(
                !shown.iter().any(|s| s == flag),
                "--{flag} is refused by chaos but shown: {shown:?}"
            );
        }
        for flag in ["steps", "workers", "processes", "device-budget", "run-dir", "config"] {
            assert!(
                shown.iter().any(|s| s == flag),
                "--{flag} missing from chaos's help: {shown:?}"
            );
        }
    }
}
