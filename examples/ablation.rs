//! The ablation table of experiment reports (the JSON files the paper examples write):
//! one row per network and setting, with the mean and range over the seeds of a setting.
//!
//!     cargo run --release --example ablation -- docs/runs/*.json --out docs/ablation.md
//!
//! `scripts/ablation.sh` runs every setting of the README's table and then this command.

use std::path::PathBuf;

use anyhow::Context;
use candle_sbp::ablation::ablation_table;
use candle_sbp::report::ExperimentReport;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Groups experiment reports by setting into a Markdown table")]
struct Args {
    /// Experiment reports (JSON), in the order their settings should appear.
    #[arg(required = true)]
    reports: Vec<PathBuf>,
    /// Also write the table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let reports = args
        .reports
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str::<ExperimentReport>(&text)
                .with_context(|| format!("{} is not an experiment report", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let table = ablation_table(&reports);
    print!("{table}");
    if let Some(out) = &args.out {
        candle_sbp::net::write_atomic(out, table.as_bytes())?;
        eprintln!("written to {}", out.display());
    }
    Ok(())
}
