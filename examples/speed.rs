//! Training-step and inference speed of LeNet5-Caffe and LeNet-500-300, with and without
//! SBP layers, and (with `--pytorch`) the same steps in PyTorch measured in the same run by
//! `benches/pytorch_reference.py`, printed side by side as a ratio.
//!
//! ```text
//! cargo run --release --example speed -- --pytorch
//! ```
//!
//! `--compressed lenet5=FILE` (repeatable) also times a network saved by an experiment
//! (`Net::save`) against its dense original at inference, both through their
//! `InferencePlan`s and through `Net::forward_t`, and prints the measured speed-up beside
//! the MACs ratio.
//!
//! Batches come from the real MNIST training set when it is in the data directory (random
//! images otherwise); timings are medians over `--steps` steps after `--warmup` steps.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_sbp::data::{self, mnist};
use candle_sbp::models::{lenet5_caffe, lenet_500_300};
use candle_sbp::train::{elbo, Adam, AdamConfig};
use candle_sbp::{LogNormalDropoutConfig, Net};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// Reuses freed memory instead of returning it to the system and faulting fresh pages in on
// the next step: worth about a quarter of a LeNet5 step with glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    /// Timed steps per network (the median is reported).
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Also run benches/pytorch_reference.py (needs python3 with torch) and print ratios.
    #[arg(long)]
    pytorch: bool,
    /// The Python interpreter for --pytorch.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Rounds of measurement (ours, then PyTorch's, in turn); the best of each is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Print the time of each phase (forward, loss, backward + Adam) too.
    #[arg(long)]
    phases: bool,
    /// The data directory (default: $SBP_DATA_DIR, else ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Time only this network (lenet5 or lenet500_300).
    #[arg(long)]
    net: Option<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A compressed network saved by an experiment, as `NET=FILE` (NET: lenet5 or
    /// lenet500_300), timed at inference against the dense NET (repeatable).
    #[arg(long, value_name = "NET=FILE")]
    compressed: Vec<String>,
    /// Time only the `--compressed` networks (no training steps).
    #[arg(long, requires = "compressed")]
    only_compressed: bool,
    /// Run everything on candle's own ops, without this crate's CPU kernels (the code
    /// path of a GPU build; `candle_sbp::ops::set_cpu_kernels(false)`).
    #[arg(long)]
    candle_ops: bool,
}

type Build = fn(Option<LogNormalDropoutConfig>, VarBuilder) -> candle_sbp::Result<Net>;

/// The networks timed, by the names the flags use.
const NETS: [(&str, Build); 2] = [("lenet5", lenet5_caffe), ("lenet500_300", lenet_500_300)];

fn batches(args: &Args, count: usize) -> Result<Vec<(Tensor, Tensor)>> {
    let dir = data::data_dir(args.data_dir.as_deref()).join("mnist");
    let device = Device::Cpu;
    let n = args.batch_size;
    match mnist::load(&dir) {
        Ok(m) => (0..count)
            .map(|k| {
                let idx: Vec<usize> = (0..n).map(|i| (k * n + i) % m.train.len()).collect();
                Ok(m.train.batch(&idx, &device)?)
            })
            .collect(),
        Err(e) => {
            eprintln!(
                "note: MNIST not found in {} ({e}); timing random images",
                dir.display()
            );
            let mut rng = StdRng::seed_from_u64(0);
            (0..count)
                .map(|_| {
                    let x: Vec<f32> = (0..n * 784).map(|_| rng.random::<f32>()).collect();
                    let y: Vec<u32> = (0..n).map(|_| rng.random_range(0..10)).collect();
                    Ok((
                        Tensor::from_vec(x, (n, 1, 28, 28), &device)?,
                        Tensor::from_vec(y, n, &device)?,
                    ))
                })
                .collect()
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One network with its optimiser, timed step by step.
struct Trainer {
    net: Net,
    adam: Adam,
    /// Per phase: whole step, forward, loss, backward + Adam, backward alone.
    times: [Vec<f64>; 5],
}

impl Trainer {
    fn new(build: Build, sbp: bool) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = build(sbp.then(LogNormalDropoutConfig::default), vb)?;
        net.reset_parameters(0)?;
        let adam = Adam::new(&net, AdamConfig::default(), AdamConfig::default())?;
        Ok(Self {
            net,
            adam,
            times: Default::default(),
        })
    }

    fn step(&mut self, (x, y): &(Tensor, Tensor), record: bool, phases: bool) -> Result<()> {
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let t0 = Instant::now();
        let logits = self.net.forward_t(x, true)?;
        let t1 = Instant::now();
        let loss = elbo(&self.net, &logits, y, 60_000, 1.0, &Default::default())?;
        let t2 = Instant::now();
        let backward_alone = if phases {
            // Backward alone (outside the step's time), to split backward from Adam.
            let tb = Instant::now();
            let _ = loss.loss.backward()?;
            Some(tb.elapsed().as_secs_f64() * 1e3)
        } else {
            None
        };
        let t3 = Instant::now();
        self.adam.backward_step(&loss.loss)?;
        let t4 = Instant::now();
        if record {
            let step = ms(t0, t2) + ms(t3, t4);
            for (k, v) in [step, ms(t0, t1), ms(t1, t2), ms(t3, t4)]
                .into_iter()
                .enumerate()
            {
                self.times[k].push(v);
            }
            self.times[4].extend(backward_alone);
        }
        Ok(())
    }

    fn medians(self) -> [f64; 5] {
        self.times
            .map(|t| if t.is_empty() { f64::NAN } else { median(t) })
    }
}

/// Median milliseconds per phase of the dense and the SBP network, stepping the two in
/// turn so that a busy machine slows both alike.
fn time_pair(args: &Args, build: Build, data: &[(Tensor, Tensor)]) -> Result<([f64; 5], [f64; 5])> {
    let mut dense = Trainer::new(build, false)?;
    let mut sbp = Trainer::new(build, true)?;
    for (k, batch) in data.iter().take(args.warmup + args.steps).enumerate() {
        let record = k >= args.warmup;
        dense.step(batch, record, args.phases)?;
        sbp.step(batch, record, args.phases)?;
    }
    Ok((dense.medians(), sbp.medians()))
}

/// Median milliseconds of an eval-mode forward pass of a dense net at this batch size.
fn time_inference(args: &Args, build: Build, x: &Tensor) -> Result<f64> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = build(None, vb)?;
    net.reset_parameters(0)?;
    Ok(time_net(&net, x, args.warmup, args.steps)? * 1e3)
}

/// Median seconds of `net.forward_t(x, false)` over `steps` runs after `warmup` untimed
/// ones: the network itself, where `report::time_forward` times its inference plan.
fn time_net(net: &Net, x: &Tensor, warmup: usize, steps: usize) -> Result<f64> {
    for _ in 0..warmup {
        net.forward_t(x, false)?;
    }
    let mut times = Vec::with_capacity(steps.max(1));
    for _ in 0..steps.max(1) {
        let t0 = Instant::now();
        let _ = net.forward_t(x, false)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// Inference of each `--compressed NET=FILE` against the dense NET, both through their
/// inference plans (the speed-up reported) and through `Net::forward_t`: the best over
/// `--rounds` of the median over `--steps` forward passes, each in turn.
fn time_compressed(args: &Args, x: &Tensor) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for spec in &args.compressed {
        let Some((name, file)) = spec.split_once('=') else {
            bail!("--compressed {spec:?}: expected NET=FILE");
        };
        let Some(&(_, build)) = NETS.iter().find(|(n, _)| *n == name) else {
            bail!("--compressed {spec:?}: unknown network {name:?} (lenet5 or lenet500_300)");
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let dense = build(None, vb)?;
        dense.reset_parameters(0)?;
        let small = Net::load(file, &Device::Cpu).with_context(|| format!("loading {file}"))?;
        for (what, net) in [("dense", &dense), ("compressed", &small)] {
            if let Some(why) = net.inference_plan()?.not_compiled_because() {
                println!("{file}: the {what} network runs uncompiled: {why}");
            }
        }
        let mut best = [f64::INFINITY; 4];
        for _ in 0..args.rounds {
            let times = [
                candle_sbp::report::time_forward(&dense, x, args.steps)?,
                candle_sbp::report::time_forward(&small, x, args.steps)?,
                time_net(&dense, x, 1, args.steps)?,
                time_net(&small, x, 1, args.steps)?,
            ];
            for (b, t) in best.iter_mut().zip(times) {
                *b = b.min(t * 1e3);
            }
        }
        let [d, c, d_net, c_net] = best;
        let macs = candle_sbp::report::total_macs(&dense) as f64
            / candle_sbp::report::total_macs(&small).max(1) as f64;
        println!(
            "{file}: dense {d:.3} ms, compressed {c:.3} ms: {:.2}× faster for {macs:.2}× fewer MACs ({:.2} of the ratio); through Net::forward_t {d_net:.3} and {c_net:.3} ms ({:.2}×, {:.2})",
            d / c,
            d / c / macs,
            d_net / c_net,
            d_net / c_net / macs
        );
        out.push(serde_json::json!({
            "net": name, "file": file, "dense_ms": d, "compressed_ms": c,
            "speedup": d / c, "macs_ratio": macs,
            "dense_net_ms": d_net, "compressed_net_ms": c_net, "speedup_net": d_net / c_net,
        }));
    }
    Ok(out)
}

fn pytorch(args: &Args) -> Result<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/pytorch_reference.py");
    let dir = data::data_dir(args.data_dir.as_deref()).join("mnist");
    let out = Command::new(&args.python)
        .arg(script)
        .args(["--steps", &args.steps.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--batch-size", &args.batch_size.to_string()])
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .with_context(|| format!("running {} {script}", args.python))?;
    if !out.status.success() {
        bail!(
            "{script} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("reading the PyTorch script's JSON")
}

/// Our medians for every network, printed as they come.
fn time_ours(
    args: &Args,
    nets: &[(&str, Build)],
    data: &[(Tensor, Tensor)],
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut ours = serde_json::Map::new();
    println!(
        "{:<14} {:>10} {:>10} {:>9} {:>9} {:>11}",
        "network", "dense ms", "SBP ms", "SBP cost", "infer ms", "images/s"
    );
    for &(name, build) in nets {
        let (dense, sbp) = time_pair(args, build, data)?;
        let infer = time_inference(args, build, &data[0].0)?;
        println!(
            "{name:<14} {:>10.2} {:>10.2} {:>8.1}% {:>9.2} {:>11.0}",
            dense[0],
            sbp[0],
            100.0 * (sbp[0] / dense[0] - 1.0),
            infer,
            args.batch_size as f64 / infer * 1e3
        );
        if args.phases {
            for (label, t) in [("dense", dense), ("sbp", sbp)] {
                println!(
                    "  {label:<6} forward {:.2} ms, loss {:.2} ms, backward+Adam {:.2} ms (backward {:.2} ms)",
                    t[1], t[2], t[3], t[4]
                );
            }
        }
        ours.insert(
            name.into(),
            serde_json::json!({
                "step_ms_dense": dense[0], "step_ms_sbp": sbp[0], "infer_ms": infer,
                "phases_ms_dense": &dense[1..4], "phases_ms_sbp": &sbp[1..4],
            }),
        );
    }
    Ok(ours)
}

/// The smallest of a field over the rounds: each side's best, on a machine whose other
/// load comes and goes.
fn best(rounds: &[serde_json::Value], net: &str, field: &str) -> Option<f64> {
    rounds
        .iter()
        .filter_map(|r| r[net][field].as_f64())
        .min_by(f64::total_cmp)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.steps == 0 || args.batch_size == 0 || args.rounds == 0 {
        bail!("--steps, --rounds and --batch-size must be positive");
    }
    let data = batches(&args, args.warmup + args.steps)?;
    let nets: Vec<(&str, Build)> = NETS
        .into_iter()
        .filter(|(name, _)| args.net.as_deref().is_none_or(|n| n == *name))
        .filter(|_| !args.only_compressed)
        .collect();
    if args.candle_ops {
        candle_sbp::ops::set_cpu_kernels(false);
    }
    println!(
        "threads: {}{}",
        candle::utils::get_num_threads(),
        if args.candle_ops {
            ", candle's own ops (--candle-ops)"
        } else {
            ""
        }
    );
    let (mut ours, mut torch) = (Vec::new(), Vec::new());
    // With --only-compressed there are no training rounds (nor PyTorch runs) at all.
    let training_rounds = if nets.is_empty() { 0 } else { args.rounds };
    for round in 0..training_rounds {
        println!("\nround {} of {}: candle-sbp", round + 1, args.rounds);
        ours.push(serde_json::Value::Object(time_ours(&args, &nets, &data)?));
        if args.pytorch {
            let t = pytorch(&args)?;
            for (name, _) in &nets {
                println!(
                    "PyTorch {} {name}: step {:.2} ms, inference {:.2} ms",
                    t["version"],
                    t[name]["step_ms"].as_f64().unwrap_or(f64::NAN),
                    t[name]["infer_ms"].as_f64().unwrap_or(f64::NAN)
                );
            }
            torch.push(t);
        }
    }
    let mut result = serde_json::json!({
        "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
        "threads": candle::utils::get_num_threads(), "candle_ops": args.candle_ops,
        "candle_sbp": ours,
    });
    if !nets.is_empty() {
        println!("\nbest of {} rounds:", args.rounds);
        println!(
            "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "network", "dense ms", "SBP ms", "SBP cost", "torch ms", "ratio", "infer ms", "ratio"
        );
        for (name, _) in &nets {
            let (d, s, i) = (
                best(&ours, name, "step_ms_dense").unwrap_or(f64::NAN),
                best(&ours, name, "step_ms_sbp").unwrap_or(f64::NAN),
                best(&ours, name, "infer_ms").unwrap_or(f64::NAN),
            );
            let (ts, ti) = (
                best(&torch, name, "step_ms").unwrap_or(f64::NAN),
                best(&torch, name, "infer_ms").unwrap_or(f64::NAN),
            );
            println!(
                "{name:<14} {d:>9.2} {s:>9.2} {:>8.1}% {ts:>9.2} {:>8.2}× {i:>9.2} {:>8.2}×",
                100.0 * (s / d - 1.0),
                d / ts,
                i / ti
            );
        }
    }
    if args.pytorch {
        result["pytorch"] = serde_json::Value::Array(torch);
    }
    if !args.compressed.is_empty() {
        println!("\ncompressed networks at batch {}:", args.batch_size);
        let x = &data[0].0;
        result["compressed"] = serde_json::Value::Array(time_compressed(&args, x)?);
    }
    if let Some(path) = &args.json {
        candle_sbp::net::write_atomic(path, serde_json::to_string_pretty(&result)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
